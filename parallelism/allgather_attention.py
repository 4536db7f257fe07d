"""All-gather attention: every device gathers the whole key/value sequence, keeps its queries.

Runs per device inside `shard_map` (see `parallelism.sequence_attention`). Communication is one
all-gather of K/V over 'sequence' forward (a reduce-scatter of their gradients backward); memory
is the gathered K/V plus a [T/n, T] score matrix per head. The causal mask uses the device's
global query offset; the natural contiguous layout is kept, so under a causal mask the last
device has the most visible keys (the work is masked, not skipped: every device computes the same
amount).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from parallelism import local_attention


def allgather_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool,
                        axis: str) -> jax.Array:
  """Per-device attention of local queries to the all-gathered keys/values.

  Args:
    q: [B, T/n, H, D] this device's contiguous share of the queries.
    k, v: [B, T/n, KVH, D] the matching keys and values; KVH divides H.
    causal: causal mask over global positions.
    axis: the sequence mesh axis.
  Returns:
    [B, T/n, H, D] in q's dtype.
  """
  k, v = (lax.all_gather(x, axis, axis=1, tiled=True) for x in (k, v))
  mask = None
  if causal:
    local = q.shape[1]
    query_pos = lax.axis_index(axis) * local + jnp.arange(local)
    mask = query_pos[:, None] >= jnp.arange(k.shape[1])[None, :]
  return local_attention.dense(q, k, v, mask)

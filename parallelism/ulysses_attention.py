"""Ulysses attention: all-to-all trades sequence sharding for head sharding, then dense attention.

Runs per device inside `shard_map` (see `parallelism.sequence_attention`). One `lax.all_to_all`
per input turns [B, T/n, H', D] into [B, T, H'/n, D] (whole sequences, a 1/n share of the
heads), each device runs ordinary attention, and one all-to-all turns the output back. The local
query heads (H' = H / tensor) must be divisible by n; key/value heads that are not are repeated
(GQA: each repeated head still serves the same query heads). Memory is a [T, T] score matrix
for H/(n * tensor) heads.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from parallelism import local_attention


def ulysses_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool, axis: str,
                      size: int) -> jax.Array:
  """Per-device Ulysses attention over the `axis` mesh axis of `size` devices.

  Args:
    q: [B, T/n, H', D] this device's contiguous share of the queries; size divides H'.
    k, v: [B, T/n, KVH', D] the matching keys and values; KVH' divides H'.
    causal: causal mask over the whole sequence.
    axis, size: the sequence mesh axis and its size n.
  Returns:
    [B, T/n, H', D] in q's dtype.
  """
  repeats = local_attention.kv_repeats(k.shape[2], q.shape[2], size)
  k, v = (jnp.repeat(x, repeats, axis=2) for x in (k, v))
  to_heads = lambda x: lax.all_to_all(x, axis, split_axis=2, concat_axis=1, tiled=True)
  q, k, v = to_heads(q), to_heads(k), to_heads(v)
  steps = q.shape[1]
  mask = jnp.tril(jnp.ones((steps, steps), bool)) if causal else None
  out = local_attention.dense(q, k, v, mask)
  return lax.all_to_all(out, axis, split_axis=1, concat_axis=2, tiled=True)

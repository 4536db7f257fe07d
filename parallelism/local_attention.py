"""Per-device attention math shared by the sequence-parallel variants.

The numerics follow `models.attention.attend` (which this layer may not import): queries are
scaled by D**-0.5 in their own dtype, scores and softmax are float32, probabilities are cast to
the values' dtype for the value product (accumulated in float32), and a masked score is the finite
-1e30. Grouped-query attention keeps queries as [B, T, KVH, G, D] (head h = kv_head * G + g).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

MASKED = -1e30


def varying_like(x: jax.Array, *refs: jax.Array) -> jax.Array:
  """x marked device-varying over every manual mesh axis the refs vary over (shard_map carries).

  jax 0.10 keeps those axes in the abstract value's `mat.varying` (formerly `vma`).
  """
  varying = lambda a: jax.typeof(a).mat.varying
  axes = frozenset().union(*map(varying, refs)) - varying(x)
  return lax.pcast(x, tuple(sorted(axes)), to="varying") if axes else x


def kv_repeats(kv_heads: int, heads: int, multiple: int) -> int:
  """Smallest r dividing heads // kv_heads such that kv_heads * r is a multiple of `multiple`.

  Repeating each key/value head r times (`jnp.repeat(k, r, axis=2)`) keeps query head h paired with
  kv head h // G; callers check that `multiple` divides `heads`, so r = G always qualifies.
  """
  group = heads // kv_heads
  return next(r for r in range(1, group + 1) if group % r == 0 and kv_heads * r % multiple == 0)


def group_queries(q: jax.Array, kv_heads: int) -> jax.Array:
  """[B, T, H, D] -> scaled [B, T, KVH, G, D] in q's dtype."""
  batch, steps, heads, head_dim = q.shape
  return (q * head_dim**-0.5).reshape(batch, steps, kv_heads, heads // kv_heads, head_dim)


def ungroup(x: jax.Array) -> jax.Array:
  """[B, T, KVH, G, D] -> [B, T, H, D]."""
  batch, steps, kv_heads, group, head_dim = x.shape
  return x.reshape(batch, steps, kv_heads * group, head_dim)


def scores(qg: jax.Array, k: jax.Array) -> jax.Array:
  """qg [B, Tq, KVH, G, D], k [B, Tk, KVH, D] -> float32 [B, KVH, G, Tq, Tk]."""
  return jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)


def dense(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
  """Softmax attention with the whole score matrix, differentiated by autodiff.

  Args:
    q: [B, Tq, H, D]; k, v: [B, Tk, KVH, D] with KVH dividing H.
    mask: [Tq, Tk] bool (query i may see key j), or None for no mask.
  Returns:
    [B, Tq, H, D] in q's dtype.
  """
  s = scores(group_queries(q, k.shape[2]), k)
  if mask is not None:
    s = jnp.where(mask, s, MASKED)
  probs = jax.nn.softmax(s, axis=-1)
  out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return ungroup(out).astype(q.dtype)

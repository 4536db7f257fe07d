"""Per-device attention math shared by the sequence-parallel variants.

The numerics follow `models.attention.attend` (which this layer may not import): queries are
scaled by D**-0.5 in their own dtype, scores and softmax are float32, probabilities are cast to
the values' dtype for the value product (accumulated in float32), and a masked score is the finite
-1e30. Grouped-query attention keeps queries as [B, T, KVH, G, D] (head h = kv_head * G + g).

* `dense`: whole-score-matrix attention, differentiated by autodiff (all-gather, Ulysses).
* `forward` / `backward`: flash-style blockwise attention over key blocks, returning and consuming
  the per-row log-sum-exp, so that the ring can merge partial results (`merge`) and recompute its
  backward block by block instead of storing score matrices.
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


def _scores(qg: jax.Array, k: jax.Array) -> jax.Array:
  """qg [B, Tq, KVH, G, D], k [B, Tk, KVH, D] -> float32 [B, KVH, G, Tq, Tk]."""
  return jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)


def _rows(x: jax.Array) -> jax.Array:
  """Per-row statistic [B, KVH, G, T] -> [B, T, KVH, G, 1], to scale [B, T, KVH, G, D] outputs."""
  return jnp.moveaxis(x, 3, 1)[..., None]


def dense(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
  """Softmax attention with the whole score matrix.

  Args:
    q: [B, Tq, H, D]; k, v: [B, Tk, KVH, D] with KVH dividing H.
    mask: [Tq, Tk] bool (query i may see key j), or None for no mask.
  Returns:
    [B, Tq, H, D] in q's dtype.
  """
  qg = group_queries(q, k.shape[2])
  s = _scores(qg, k)
  if mask is not None:
    s = jnp.where(mask, s, MASKED)
  probs = jax.nn.softmax(s, axis=-1)
  out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return ungroup(out).astype(q.dtype)


def _block_size(steps: int, block: int) -> int:
  """The largest divisor of `steps` that is at most `block`."""
  return next(b for b in range(min(block, steps), 0, -1) if steps % b == 0)


def _key_blocks(x: jax.Array, size: int) -> jax.Array:
  """[B, Tk, ...] -> [Tk / size, B, size, ...], the scanned-over key blocks."""
  return jnp.moveaxis(x.reshape(x.shape[0], -1, size, *x.shape[2:]), 1, 0)


def _causal_keep(steps: int, start: jax.Array, size: int) -> jax.Array:
  """[Tq, size] bool: query t sees key start + s when t >= start + s (queries and keys aligned)."""
  return jnp.arange(steps)[:, None] >= start + jnp.arange(size)[None, :]


def forward(qg: jax.Array, k: jax.Array, v: jax.Array, causal: bool,
            block: int) -> tuple[jax.Array, jax.Array]:
  """Online-softmax attention over key blocks of at most `block` keys.

  Args:
    qg: [B, Tq, KVH, G, D] scaled grouped queries.
    k, v: [B, Tk, KVH, D].
    causal: queries and keys are the same positions (Tq == Tk); query t sees keys <= t.
    block: key block size; memory is O(Tq * block) per head.
  Returns:
    (out [B, Tq, KVH, G, D] float32 normalised, lse [B, KVH, G, Tq] float32 log-sum-exp of the
    scores; MASKED for a row that sees no key).
  """
  batch, steps, kv_heads, group, head_dim = qg.shape
  size = _block_size(k.shape[1], block)
  starts = jnp.arange(0, k.shape[1], size)

  def body(carry, blocks):
    acc, peak, total = carry
    kb, vb, start = blocks
    s = _scores(qg, kb)
    if causal:
      keep = _causal_keep(steps, start, size)
      s = jnp.where(keep, s, MASKED)
    new_peak = jnp.maximum(peak, jnp.max(s, axis=-1))
    p = jnp.exp(s - new_peak[..., None])
    if causal:
      p = jnp.where(keep, p, 0.0)
    decay = jnp.exp(peak - new_peak)
    total = total * decay + jnp.sum(p, axis=-1)
    mixed = jnp.einsum("bkgts,bskd->btkgd", p.astype(vb.dtype), vb,
                       preferred_element_type=jnp.float32)
    return (acc * _rows(decay) + mixed, new_peak, total), None

  stats = jnp.full((batch, kv_heads, group, steps), MASKED, jnp.float32)
  init = (varying_like(jnp.zeros(qg.shape, jnp.float32), qg, k, v),
          varying_like(stats, qg, k, v), varying_like(jnp.zeros_like(stats), qg, k, v))
  (acc, peak, total), _ = lax.scan(body, init, (_key_blocks(k, size), _key_blocks(v, size), starts))
  seen = total > 0
  out = acc / _rows(jnp.where(seen, total, 1.0))
  return out, jnp.where(seen, peak + jnp.log(jnp.where(seen, total, 1.0)), MASKED)


def merge(out_a: jax.Array, lse_a: jax.Array, out_b: jax.Array,
          lse_b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Combines two normalised partial attentions over disjoint key sets (same shapes as `forward`)."""
  lse = jnp.logaddexp(lse_a, lse_b)
  return out_a * _rows(jnp.exp(lse_a - lse)) + out_b * _rows(jnp.exp(lse_b - lse)), lse


def backward(qg: jax.Array, k: jax.Array, v: jax.Array, dout: jax.Array, lse: jax.Array,
             delta: jax.Array, causal: bool,
             block: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Gradients of one query/key pairing, recomputing probabilities block by block.

  Args:
    qg, k, v, causal, block: as in `forward`.
    dout: [B, Tq, KVH, G, D] float32 gradient of the final (fully merged) output.
    lse: [B, KVH, G, Tq] the final log-sum-exp over all keys the queries see.
    delta: [B, KVH, G, Tq] sum over D of dout * final output.
  Returns:
    float32 (d qg [B, Tq, KVH, G, D] w.r.t. the scaled queries, dk, dv [B, Tk, KVH, D]).
  """
  steps = qg.shape[1]
  size = _block_size(k.shape[1], block)
  starts = jnp.arange(0, k.shape[1], size)

  def body(dq, blocks):
    kb, vb, start = blocks
    s = _scores(qg, kb)
    p = jnp.exp(s - lse[..., None])
    if causal:
      p = jnp.where(_causal_keep(steps, start, size), p, 0.0)
    dv = jnp.einsum("bkgts,btkgd->bskd", p, dout)
    dp = jnp.einsum("btkgd,bskd->bkgts", dout, vb, preferred_element_type=jnp.float32)
    ds = p * (dp - delta[..., None])
    dq = dq + jnp.einsum("bkgts,bskd->btkgd", ds, kb, preferred_element_type=jnp.float32)
    dk = jnp.einsum("bkgts,btkgd->bskd", ds, qg, preferred_element_type=jnp.float32)
    return dq, (dk, dv)

  dq0 = varying_like(jnp.zeros(qg.shape, jnp.float32), qg, k, v, dout)
  dq, (dk, dv) = lax.scan(body, dq0, (_key_blocks(k, size), _key_blocks(v, size), starts))
  unblock = lambda x: jnp.moveaxis(x, 0, 1).reshape(k.shape)
  return dq, unblock(dk), unblock(dv)

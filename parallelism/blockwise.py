"""Flash-style blockwise attention of one query/key pairing, with its log-sum-exp.

`forward` visits [block x block] tiles (queries mapped, keys scanned with an online softmax) and
returns the normalised output with the per-row log-sum-exp, so that partial results over disjoint
key sets combine exactly (`merge`); `backward` recomputes each tile's probabilities from that
log-sum-exp instead of storing them. Memory is O(block^2) scores per head plus O(T) rows, which is
what lets ring attention's backward keep only O(T/n) residuals. Inputs use the grouped layout of
`parallelism.local_attention` (queries [B, T, KVH, G, D], pre-scaled).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from parallelism.local_attention import MASKED, scores, varying_like


def _block_size(steps: int, block: int) -> int:
  """The largest divisor of `steps` that is at most `block`."""
  return next(b for b in range(min(block, steps), 0, -1) if steps % b == 0)


def _split(x: jax.Array, size: int, axis: int) -> jax.Array:
  """Cuts `axis` into blocks of `size`, block index first.

  [..., T, ...] -> [T / size, ..., size, ...].
  """
  shape = x.shape[:axis] + (x.shape[axis] // size, size) + x.shape[axis + 1:]
  return jnp.moveaxis(x.reshape(shape), axis, 0)


def _join(x: jax.Array, axis: int) -> jax.Array:
  """Inverse of `_split`."""
  x = jnp.moveaxis(x, 0, axis)
  return x.reshape(x.shape[:axis] + (-1,) + x.shape[axis + 2:])


def _starts(steps: int, size: int) -> jax.Array:
  return jnp.arange(0, steps, size, dtype=jnp.int32)


def _keep(q_start, q_size: int, k_start, k_size: int) -> jax.Array:
  """[q_size, k_size] bool causal mask of a tile: query position >= key position."""
  return (q_start + jnp.arange(q_size))[:, None] >= (k_start + jnp.arange(k_size))[None, :]


def _rows(x: jax.Array) -> jax.Array:
  """Per-row statistic [B, KVH, G, T] -> [B, T, KVH, G, 1], to scale [B, T, KVH, G, D] outputs."""
  return jnp.moveaxis(x, 3, 1)[..., None]


def forward(qg: jax.Array, k: jax.Array, v: jax.Array, causal: bool,
            block: int) -> tuple[jax.Array, jax.Array]:
  """Online-softmax attention over [block x block] tiles.

  Args:
    qg: [B, Tq, KVH, G, D] scaled grouped queries.
    k, v: [B, Tk, KVH, D].
    causal: queries and keys are the same positions (Tq == Tk); query t sees keys <= t.
    block: tile edge (the largest divisor of each length that is at most `block`).
  Returns:
    (out [B, Tq, KVH, G, D] float32 normalised, lse [B, KVH, G, Tq] float32 log-sum-exp of the
    scores; MASKED for a row that sees no key).
  """
  q_size, k_size = _block_size(qg.shape[1], block), _block_size(k.shape[1], block)
  keys = (_split(k, k_size, 1), _split(v, k_size, 1), _starts(k.shape[1], k_size))

  def query_block(blocks):
    qb, q_start = blocks

    def key_block(carry, blocks):
      acc, peak, total = carry
      kb, vb, k_start = blocks
      s = scores(qb, kb)
      if causal:
        keep = _keep(q_start, q_size, k_start, k_size)
        s = jnp.where(keep, s, MASKED)
      new_peak = jnp.maximum(peak, jnp.max(s, axis=-1))
      p = jnp.exp(s - new_peak[..., None])
      if causal:
        p = jnp.where(keep, p, 0.0)
      decay = jnp.exp(peak - new_peak)
      mixed = jnp.einsum("bkgts,bskd->btkgd", p.astype(vb.dtype), vb,
                         preferred_element_type=jnp.float32)
      return (acc * _rows(decay) + mixed, new_peak, total * decay + jnp.sum(p, axis=-1)), None

    stats = jnp.full(qb.shape[:1] + qb.shape[2:4] + qb.shape[1:2], MASKED, jnp.float32)
    init = tuple(varying_like(x, qb, k, v) for x in (
        jnp.zeros(qb.shape, jnp.float32), stats, jnp.zeros_like(stats)))
    (acc, peak, total), _ = lax.scan(key_block, init, keys)
    seen = total > 0
    total = jnp.where(seen, total, 1.0)
    return acc / _rows(total), jnp.where(seen, peak + jnp.log(total), MASKED)

  out, lse = lax.map(query_block, (_split(qg, q_size, 1), _starts(qg.shape[1], q_size)))
  return _join(out, 1), _join(lse, 3)


def merge(out_a: jax.Array, lse_a: jax.Array, out_b: jax.Array,
          lse_b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Combines two normalised partial attentions over disjoint key sets (shapes as `forward`'s)."""
  lse = jnp.logaddexp(lse_a, lse_b)
  return out_a * _rows(jnp.exp(lse_a - lse)) + out_b * _rows(jnp.exp(lse_b - lse)), lse


def backward(qg: jax.Array, k: jax.Array, v: jax.Array, dout: jax.Array, lse: jax.Array,
             delta: jax.Array, causal: bool,
             block: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Gradients of one query/key pairing, recomputing probabilities tile by tile.

  Args:
    qg, k, v, causal, block: as in `forward`.
    dout: [B, Tq, KVH, G, D] float32 gradient of the final (fully merged) output.
    lse: [B, KVH, G, Tq] the final log-sum-exp over all keys the queries see.
    delta: [B, KVH, G, Tq] sum over D of dout * final output.
  Returns:
    float32 (d qg [B, Tq, KVH, G, D] w.r.t. the scaled queries, dk, dv [B, Tk, KVH, D]).
  """
  q_size, k_size = _block_size(qg.shape[1], block), _block_size(k.shape[1], block)
  keys = (_split(k, k_size, 1), _split(v, k_size, 1), _starts(k.shape[1], k_size))

  def query_block(dkv, blocks):
    qb, dob, lseb, deltab, q_start = blocks

    def key_block(dq, blocks):
      kb, vb, k_start = blocks
      p = jnp.exp(scores(qb, kb) - lseb[..., None])
      if causal:
        p = jnp.where(_keep(q_start, q_size, k_start, k_size), p, 0.0)
      dv = jnp.einsum("bkgts,btkgd->bskd", p, dob)
      dp = jnp.einsum("btkgd,bskd->bkgts", dob, vb, preferred_element_type=jnp.float32)
      ds = p * (dp - deltab[..., None])
      dq = dq + jnp.einsum("bkgts,bskd->btkgd", ds, kb, preferred_element_type=jnp.float32)
      dk = jnp.einsum("bkgts,btkgd->bskd", ds, qb, preferred_element_type=jnp.float32)
      return dq, (dk, dv)

    dq0 = varying_like(jnp.zeros(qb.shape, jnp.float32), qb, k, v, dob)
    dq, (dk, dv) = lax.scan(key_block, dq0, keys)
    return (dkv[0] + _join(dk, 1), dkv[1] + _join(dv, 1)), dq

  zeros = varying_like(jnp.zeros(k.shape, jnp.float32), qg, k, v, dout)
  queries = (_split(qg, q_size, 1), _split(dout, q_size, 1), _split(lse, q_size, 3),
             _split(delta, q_size, 3), _starts(qg.shape[1], q_size))
  (dk, dv), dq = lax.scan(query_block, (zeros, zeros), queries)
  return _join(dq, 1), dk, dv

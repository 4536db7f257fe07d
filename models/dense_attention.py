"""Cache-free dense attention for training and prefill: a hand-written backward pass, and causal
attention that skips the key blocks a query block cannot see.

`attention.attend` is the reference; autodiff through it makes XLA carry the softmax's T x T
intermediates through several layouts and elementwise passes (about 35% of a train step of the
12 x d256 model at T = 256 on CPU). Here the backward pass is FlashAttention's (Dao et al., 2022,
"FlashAttention: Fast and Memory-Efficient Exact Attention with IO-Awareness", Alg. 4):

  P = softmax(Q K^T / sqrt(D) + mask)      saved from the forward pass
  dV = P^T dO,  dP = dO V^T,  dS = P * (dP - rowsum(dO * O)),  dQ = dS K / sqrt(D),
  dK = dS^T Q / sqrt(D)

one T x T elementwise pass instead of the chain of the softmax's derivative. The probabilities are
kept (not recomputed as FlashAttention does on GPU): on CPU memory is not the bound, matmuls are.

Causal attention splits the queries into blocks; block i attends only to keys 0 .. end of block
i, so the score and value products of a T-token sequence shrink to (n + 1) / 2n of the full
square (n blocks). Each block's softmax covers all the keys it may see, so the result is the
dense result, not an approximation.

Layout: grouped-query heads are handled as [B, KVH, G, T, D], where every query head of a
key/value group multiplies that group's keys directly (no repeated keys).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

# Finite rather than -inf, as in `attention.attend`: a fully masked row softmaxes to uniform.
_MASKED = -1e30
# Causal attention uses about this many query blocks (each at least MIN_BLOCK tokens long).
_BLOCKS = 8
MIN_BLOCK = 64


def _probabilities(q: jax.Array, k: jax.Array, keep: jax.Array) -> jax.Array:
  """softmax(q k^T) [B, KVH, G, Tq, S] in float32; q is already scaled."""
  s = jnp.einsum("bkgtd,bksd->bkgts", q, k, preferred_element_type=jnp.float32)
  s = jnp.where(keep, s, _MASKED)
  s = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
  return s * (1.0 / jnp.sum(s, axis=-1, keepdims=True))


def _mix(p: jax.Array, v: jax.Array) -> jax.Array:
  return jnp.einsum("bkgts,bksd->bkgtd", p.astype(v.dtype), v,
                    preferred_element_type=jnp.float32).astype(v.dtype)


@jax.custom_vjp
def _attention(q: jax.Array, k: jax.Array, v: jax.Array, keep: jax.Array) -> jax.Array:
  """q [B, KVH, G, Tq, D] (scaled), k, v [B, KVH, S, D], keep [B or 1, 1, 1, Tq, S] bool."""
  return _mix(_probabilities(q, k, keep), v)


def _attention_fwd(q, k, v, keep):
  p = _probabilities(q, k, keep)
  out = _mix(p, v)
  return out, (q, k, v, keep, out, p)


def _row_term(d_out: jax.Array, out: jax.Array) -> jax.Array:
  """rowsum(dO * O) = rowsum(P * dP), [B, KVH, G, Tq, 1] float32: the softmax's normaliser term."""
  return jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)


def _attention_bwd(residuals, d_out):
  q, k, v, keep, out, p = residuals
  f32 = functools.partial(jnp.einsum, preferred_element_type=jnp.float32)
  d_v = f32("bkgts,bkgtd->bksd", p.astype(d_out.dtype), d_out)
  d_p = f32("bkgtd,bksd->bkgts", d_out, v)
  # Masked scores are constants: no gradient, even in a fully masked (uniform) row.
  d_s = jnp.where(keep, p * (d_p - _row_term(d_out, out)), 0.0).astype(q.dtype)
  d_q = f32("bkgts,bksd->bkgtd", d_s, k)
  d_k = f32("bkgts,bkgtd->bksd", d_s, q)
  return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), None


_attention.defvjp(_attention_fwd, _attention_bwd)


def _grouped(q: jax.Array, k: jax.Array, v: jax.Array):
  """[B, T, H, D] q and [B, S, KVH, D] k, v -> q [B, KVH, G, T, D] scaled, k, v [B, KVH, S, D]."""
  batch, steps, heads, head_dim = q.shape
  kv_heads = k.shape[2]
  q = (q * head_dim**-0.5).reshape(batch, steps, kv_heads, heads // kv_heads, head_dim)
  return q.transpose(0, 2, 3, 1, 4), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


def _ungrouped(out: jax.Array) -> jax.Array:
  """[B, KVH, G, T, D] -> [B, T, H, D]."""
  batch, kv_heads, group, steps, head_dim = out.shape
  return out.transpose(0, 3, 1, 2, 4).reshape(batch, steps, kv_heads * group, head_dim)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """Cache-free attention under an explicit mask; equals `attention.attend(q, k, v, mask)`.

  Args:
    q: [B, T, H, D] rotated queries.
    k, v: [B, T, KVH, D] rotated keys and values; KVH divides H.
    mask: [B or 1, T, T] bool, mask[b, i, j] = query i may attend to key j.
  Returns:
    [B, T, H, D] in q's dtype; scores and softmax in float32.
  """
  q, k, v = _grouped(q, k, v)
  return _ungrouped(_attention(q, k, v, mask[:, None, None]))


def block_bounds(steps: int) -> list[tuple[int, int]]:
  """The causal query blocks [(start, end)] of a `steps`-token sequence."""
  size = max(MIN_BLOCK, math.ceil(steps / _BLOCKS))
  return [(start, min(start + size, steps)) for start in range(0, steps, size)]


def causal(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """Causal self-attention; equals `attention.attend` under a lower-triangular mask.

  Args:
    q: [B, T, H, D] rotated queries; k, v: [B, T, KVH, D].
  Returns:
    [B, T, H, D] in q's dtype.
  """
  q, k, v = _grouped(q, k, v)
  outs = []
  for start, end in block_bounds(q.shape[3]):
    keep = jnp.arange(start, end)[:, None] >= jnp.arange(end)[None, :]
    outs.append(_attention(q[:, :, :, start:end], k[:, :, :end], v[:, :, :end],
                           keep[None, None, None]))
  return _ungrouped(jnp.concatenate(outs, axis=3) if len(outs) > 1 else outs[0])

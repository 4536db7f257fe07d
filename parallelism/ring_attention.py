"""Ring attention: key/value blocks travel around the 'sequence' ring while queries stay put.

Runs per device inside `shard_map` (see `parallelism.sequence_attention`). With n devices each
holds T/n queries and one key/value block; over n steps every block visits every device
(`lax.ppermute` to the next device, issued before the step's compute so the transfer can overlap
it), and the partial attentions are merged with their log-sum-exps (online softmax). Within a
step, `blockwise.forward` works in [block x block] tiles, so scores never exceed block^2 per head.

Causal attention uses the zig-zag layout (`parallelism.zigzag`): device i holds chunks i and
2n-1-i, so on every off-diagonal step a device attends either all its queries to the visiting
block's early chunk or its late queries to the whole block; both are half a block's work, the
same on every device.

The backward is a `jax.custom_vjp` that stores only O(T/n) residuals (q, k, v, output,
log-sum-exp) and recomputes probabilities block by block, flash-attention style; the key/value
gradients travel around the ring with their blocks and arrive home after n shifts.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from parallelism import blockwise, local_attention, zigzag


def ring_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool, axis: str,
                   size: int, block: int) -> jax.Array:
  """Per-device ring attention over the `axis` ring of `size` devices.

  Args:
    q: [B, T/n, H, D] this device's contiguous share of the queries.
    k, v: [B, T/n, KVH, D] the matching keys and values; KVH divides H.
    causal: causal mask over global positions (needs T/n even: two zig-zag chunks per device).
    axis, size: the sequence mesh axis and its size n.
    block: tile edge of the per-step blockwise computation.
  Returns:
    [B, T/n, H, D] in q's dtype.
  """
  if not causal:
    return _ring(q, k, v, causal, axis, size, block)
  q, k, v = (zigzag.to_zigzag(x, axis, size) for x in (q, k, v))
  return zigzag.from_zigzag(_ring(q, k, v, causal, axis, size, block), axis, size)


def _shift(tree, axis: str, size: int):
  """Sends every array of `tree` to the next device on the ring."""
  return lax.ppermute(tree, axis, [(i, (i + 1) % size) for i in range(size)])


def _pad_front(x: jax.Array, axis: int, fill: float) -> jax.Array:
  """Doubles `axis` by putting a block of `fill` before x (the early chunk that saw nothing)."""
  return jnp.concatenate([jnp.full_like(x, fill), x], axis=axis)


def _pad_back(x: jax.Array, axis: int) -> jax.Array:
  """Doubles `axis` by putting zeros after x (the late chunk that got no gradient)."""
  return jnp.concatenate([x, jnp.zeros_like(x)], axis=axis)


def _visit(qg, kv, source, index, causal, block):
  """Partial attention (out, lse) of the local queries to device `source`'s block, source != index.

  Zig-zag: if the source comes earlier on the ring, all local queries see its early chunk and none
  its late one; otherwise only the local late chunk sees the block, all of it.
  """
  k, v = kv
  if not causal:
    return blockwise.forward(qg, k, v, False, block)
  half = qg.shape[1] // 2

  def earlier():
    return blockwise.forward(qg, k[:, :half], v[:, :half], False, block)

  def later():
    out, lse = blockwise.forward(qg[:, half:], k, v, False, block)
    return _pad_front(out, 1, 0.0), _pad_front(lse, 3, local_attention.MASKED)

  return lax.cond(source < index, earlier, later)


def _visit_grad(qg, kv, dout, lse, delta, source, index, causal, block):
  """Gradients (d qg, dk, dv) of the pairing `_visit` computed, all at full local shapes."""
  k, v = kv
  if not causal:
    return blockwise.backward(qg, k, v, dout, lse, delta, False, block)
  half = qg.shape[1] // 2

  def earlier():
    dq, dk, dv = blockwise.backward(qg, k[:, :half], v[:, :half], dout, lse, delta, False, block)
    return dq, _pad_back(dk, 1), _pad_back(dv, 1)

  def later():
    dq, dk, dv = blockwise.backward(qg[:, half:], k, v, dout[:, half:], lse[..., half:],
                                    delta[..., half:], False, block)
    return _pad_front(dq, 1, 0.0), dk, dv

  return lax.cond(source < index, earlier, later)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _ring(q, k, v, causal, axis, size, block):
  """Ring attention in the layout it is given; q [B, Tl, H, D], k/v [B, Tl, KVH, D]."""
  return _ring_fwd(q, k, v, causal, axis, size, block)[0]


def _ring_fwd(q, k, v, causal, axis, size, block):
  qg = local_attention.group_queries(q, k.shape[2])
  index = lax.axis_index(axis)
  kv = _shift((k, v), axis, size)  # the previous device's block, in flight during the diagonal
  out, lse = blockwise.forward(qg, k, v, causal, block)

  def visit(step, out, lse, kv):
    partial = _visit(qg, kv, (index - step) % size, index, causal, block)
    return blockwise.merge(out, lse, *partial)

  def body(step, carry):
    out, lse, kv = carry
    return (*visit(step, out, lse, kv), _shift(kv, axis, size))

  out, lse, kv = lax.fori_loop(1, size - 1, body, (out, lse, kv))
  out, lse = visit(size - 1, out, lse, kv)
  out = local_attention.ungroup(out).astype(q.dtype)
  return out, (q, k, v, out, lse)


def _ring_bwd(causal, axis, size, block, residuals, dout):
  q, k, v, out, lse = residuals
  qg = local_attention.group_queries(q, k.shape[2])
  grouped = lambda x: x.astype(jnp.float32).reshape(qg.shape)
  dout = grouped(dout)
  delta = jnp.moveaxis(jnp.sum(dout * grouped(out), axis=-1), 1, 3)  # [B, KVH, G, Tl]
  index = lax.axis_index(axis)
  kv = _shift((k, v), axis, size)
  dq, dk, dv = blockwise.backward(qg, k, v, dout, lse, delta, causal, block)
  dkv = _shift((dk, dv), axis, size)  # gradients travel with their block

  def visit(step, dq, kv, dkv):
    ddq, ddk, ddv = _visit_grad(qg, kv, dout, lse, delta, (index - step) % size, index, causal,
                                block)
    return dq + ddq, (dkv[0] + ddk, dkv[1] + ddv)

  def body(step, carry):
    dq, kv, dkv = carry
    dq, dkv = visit(step, dq, kv, dkv)
    return dq, _shift(kv, axis, size), _shift(dkv, axis, size)

  dq, kv, dkv = lax.fori_loop(1, size - 1, body, (dq, kv, dkv))
  dq, dkv = visit(size - 1, dq, kv, dkv)
  dk, dv = _shift(dkv, axis, size)  # n-th shift: each block's gradient is back on its owner
  dq = local_attention.ungroup(dq * q.shape[-1]**-0.5)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_ring.defvjp(_ring_fwd, _ring_bwd)

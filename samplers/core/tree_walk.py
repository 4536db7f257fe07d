"""Verification of a drafted token tree, one row at a time: the walk from the root down.

`walk` is the general rule (recursive rejection among the children at each node, so the output has
exactly the target's distribution); `greedy_walk` is the same walk with one-hot target and draft
distributions, in closed form (no uniforms, no probabilities). `samplers.tree` vmaps them over
rows.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from samplers.core import verify as rules
from samplers.core.logits import SamplingParams, probs


def walk(u, p, qs, tokens, parent, valid):
  """One row's verification from the root down.

  Args:
    u: [D + 1, N + V] uniforms of the positions decided at depths 1..D and the bonus position.
    p: [1 + N, V] target distributions after the root and after each node.
    qs: [N, V]; tokens, parent (-1: root), valid: [N].
  Returns:
    (accepted count [] int32, the round's last token [] int32, path [D] int32 accepted nodes).
  """
  depth_max, size = u.shape[0] - 1, tokens.shape[0]

  def step(carry, u_d):
    current, alive, count, last = carry
    active = alive & valid & (parent == current)
    index, token = rules.recursive_rejection(u_d, p[current + 1], qs, tokens, active)
    accepted = alive & (index >= 0)
    last = jnp.where(alive & ~accepted, token, last)
    return ((jnp.where(accepted, index, current), accepted, count + accepted, last),
            jnp.where(accepted, index, 0))

  start = (jnp.int32(-1), jnp.bool_(True), jnp.int32(0), jnp.int32(0))
  (current, alive, count, last), path = jax.lax.scan(step, start, u[:depth_max])
  last = jnp.where(alive, rules.draw(u[depth_max, size:], p[current + 1]), last)
  return count, last, path.astype(jnp.int32)


def greedy_walk(top, tokens, parent, valid, depth_max: int):
  """`walk` with one-hot p and qs, in closed form: from the root, follow the first child whose
  token is the target's argmax; emit the argmax where no child matches (or after depth D).

  Args:
    top: [1 + N] int32 the target's argmax after the root and after each node.
    tokens, parent (-1: root), valid: [N].
    depth_max: D, the tree's depth (static).
  Returns:
    (accepted count [] int32, last token [] int32, path [D] int32) as `walk`.
  """

  def step(carry, _):
    current, alive, count = carry
    match = alive & valid & (parent == current) & (tokens == top[current + 1])
    accepted = jnp.any(match)
    index = jnp.argmax(match).astype(jnp.int32)
    return ((jnp.where(accepted, index, current), accepted, count + accepted),
            jnp.where(accepted, index, 0))

  (current, _, count), path = jax.lax.scan(step, (jnp.int32(-1), jnp.bool_(True), jnp.int32(0)),
                                           None, length=depth_max)
  return count, top[current + 1], path.astype(jnp.int32)



def verify(logits: jax.Array, tokens: jax.Array, parent: jax.Array, valid: jax.Array,
           depth_max: int, sampling: SamplingParams, u: jax.Array | None = None,
           qs: jax.Array | None = None):
  """Verifies every row's token tree from one target call (`walk`, or `greedy_walk` when greedy).

  Args:
    logits: [B, 1 + N, V] the target's after the root and after each node.
    tokens, valid: [B, N]; parent: [N] or [B, N] int32 (-1: the root).
    depth_max: D, the tree's depth (static).
    sampling: `SamplingParams`; u: [B, D + 1, N + V] uniforms of the decided positions (unused
      when greedy); qs: [B, N, V] the laws the nodes were drawn from, default one-hot
      (deterministic drafts).
  Returns:
    (count [B], path [B, D]) as `walk`, and emitted [B, D + 1] int32: the path's tokens, then
    the round's last token; the row emits emitted[b, :count[b] + 1].
  """
  batch, size = tokens.shape
  parent = jnp.broadcast_to(parent, (batch, size))
  if sampling.greedy:
    top = jnp.argmax(logits.astype(jnp.float32), axis=-1).astype(jnp.int32)  # [B, 1 + N]
    walk_row = functools.partial(greedy_walk, depth_max=depth_max)
    count, last, path = jax.vmap(walk_row)(top, tokens, parent, valid)
  else:
    if qs is None:
      qs = jax.nn.one_hot(tokens, logits.shape[-1], dtype=jnp.float32)
    count, last, path = jax.vmap(walk)(u, probs(logits, sampling), qs, tokens, parent, valid)
  return count, path, emitted_along(tokens, count, last, path)


def emitted_along(tokens: jax.Array, count: jax.Array, last: jax.Array,
                  path: jax.Array) -> jax.Array:
  """[B, D + 1] int32: each row's accepted path tokens (tokens [B, N] at path [B, D]), then
  its last token [B] from position count [B] on."""
  path_tokens = jnp.take_along_axis(tokens, path, axis=1)
  index = jnp.arange(path.shape[1] + 1)[None, :]
  return jnp.where(index < count[:, None],
                   jnp.concatenate([path_tokens, path_tokens[:, :1]], axis=1), last[:, None])

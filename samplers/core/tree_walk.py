"""Verification of a drafted token tree, one row at a time: the walk from the root down.

`walk` is the general rule (recursive rejection among the children at each node, so the output has
exactly the target's distribution); `greedy_walk` is the same walk with one-hot target and draft
distributions, in closed form (no uniforms, no probabilities). `samplers.tree` vmaps them over
rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from samplers.core import verify


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
    index, token = verify.recursive_rejection(u_d, p[current + 1], qs, tokens, active)
    accepted = alive & (index >= 0)
    last = jnp.where(alive & ~accepted, token, last)
    return ((jnp.where(accepted, index, current), accepted, count + accepted, last),
            jnp.where(accepted, index, 0))

  start = (jnp.int32(-1), jnp.bool_(True), jnp.int32(0), jnp.int32(0))
  (current, alive, count, last), path = jax.lax.scan(step, start, u[:depth_max])
  last = jnp.where(alive, verify.draw(u[depth_max, size:], p[current + 1]), last)
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

"""Dynamic token trees grown by draft path probability under a node budget (DySpec, Xiong et al.
2024; EAGLE-2's context-aware tree, Li et al. 2024).

A tree lives in N slots per row: each slot holds a node's path probability (`value`, the product
of the draft's probabilities along its path; -1 marks an empty slot), its token, its parent's slot
(-1: the root) and its depth. After growth step d the slots hold the N best drafted sequences of
at most d tokens; the best of at most d + 1 tokens are among them and their children, so each
step only needs the drafter's distributions at the depth-d nodes. Children are deterministic
(each node's most probable tokens), so a verifier treats them as point masses, which keeps any
temperature exact. Everything is per row and jit-compatible; samplers differ only in how they
call their drafter on the tree so far (`samplers.tree` re-feeds it to a draft model,
`samplers.eagle_tree` to the target's feature-level head).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from samplers.core.logits import SamplingParams, probs


class Nodes(NamedTuple):
  """A row batch of trees in N slots: value [B, N] float32 path probability (-1: empty slot),
  token [B, N] int32, parent [B, N] int32 slot (-1: the root), depth [B, N] int32 (0: empty)."""

  value: jax.Array
  token: jax.Array
  parent: jax.Array
  depth: jax.Array

  @property
  def valid(self) -> jax.Array:
    """[B, N] bool, the slots that hold a node."""
    return self.value > 0


def empty(batch: int, size: int) -> Nodes:
  """N empty slots per row."""
  return Nodes(jnp.full((batch, size), -1.0, jnp.float32), jnp.zeros((batch, size), jnp.int32),
               jnp.full((batch, size), -1, jnp.int32), jnp.zeros((batch, size), jnp.int32))


def fan(children: int, size: int, vocab: int) -> int:
  """Candidate children per expanded node: `children` (0: up to the N = `size` slots), at most
  the vocabulary."""
  return min(children or size, vocab)


def ranking(logits: jax.Array, sampling: SamplingParams) -> jax.Array:
  """Draft probabilities [..., V] that rank children: q, or softmax of the raw logits (greedy)."""
  if sampling.greedy:
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  return probs(logits, sampling)


def _merge(value, token, parent, depth, c_value, c_token, c_parent, c_depth):
  """One row: keeps the N best of the tree's N slots [N] and C candidates [C] by path
  probability (ties: shallower first, so the kept set stays closed under parents). Kept nodes
  stay in their slots (their parent indices stay valid); new ones fill the freed slots."""
  size = value.shape[0]
  all_value = jnp.concatenate([value, c_value])
  order = jnp.lexsort((jnp.concatenate([depth, c_depth]), -all_value))[:size]
  chosen = jnp.zeros(all_value.shape, bool).at[order].set(True) & (all_value > 0)
  keep, new = chosen[:size], chosen[size:]
  free = jnp.argsort(keep, stable=True)  # freed slots first, in slot order
  dest = jnp.where(new, free[jnp.clip(jnp.cumsum(new) - 1, 0, size - 1)], size)

  def put(old, cand, empty_value):
    return jnp.where(keep, old, empty_value).at[dest].set(cand, mode="drop")

  return (put(value, c_value, -1.0), put(token, c_token, 0), put(parent, c_parent, -1),
          put(depth, c_depth, 0))


def grow(nodes: Nodes, ranked: jax.Array, d: int, fan: int) -> Nodes:
  """Growth step d: the N best of the tree and the candidate children of its depth-(d - 1) nodes.

  Args:
    nodes: the tree after step d - 1 (`empty` before step 1).
    ranked: the drafter's child probabilities (`ranking`): [B, V] after the root when d == 1,
      else [B, N, V] after each slot's node (slots of other depths are ignored).
    d: the depth grown (static, >= 1).
    fan: candidate children per expanded node (static, <= V).
  Returns:
    the tree after step d.
  """
  batch, size = nodes.value.shape
  top, c_token = jax.lax.top_k(ranked, fan)  # [B, fan] or [B, N, fan]
  if d == 1:
    c_value, c_parent = top, jnp.full((batch, fan), -1, jnp.int32)
  else:
    expand = nodes.valid & (nodes.depth == d - 1)
    c_value = jnp.where(expand[..., None] & (top > 0), nodes.value[..., None] * top, -1.0)
    c_parent = jnp.broadcast_to(jnp.arange(size, dtype=jnp.int32)[None, :, None], top.shape)
    c_value, c_token, c_parent = (x.reshape(batch, -1) for x in (c_value, c_token, c_parent))
  c_depth = jnp.full(c_value.shape, d, jnp.int32)
  return Nodes(*jax.vmap(_merge)(*nodes, c_value, c_token.astype(jnp.int32), c_parent, c_depth))

"""Static token-tree structure (SpecInfer, Miao et al. 2024) and tree attention masks.

A static tree is a tuple of branching factors: (2, 2, 1) gives the root (the row's last
committed token) 2 children, each of those 2 children, each of those 1 child: 2, 4, 4 nodes at
depths 1, 2, 3. Nodes are numbered breadth first, siblings consecutive, children in parent order;
everything here is numpy computed at trace time.
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class StaticTree:
  """Attributes (N nodes, D = len(branching)):
    branching: children per node at each depth.
    level_sizes: (n_1, ..., n_D) nodes per depth.
    parent: [N] int32 parent node, -1 for the root's children.
    depth: [N] int32 in 1..D (also the node's position offset from the root).
    ancestors: [N, N] bool, node i sees node j (j is i or an ancestor of i).
  """

  branching: tuple[int, ...]
  level_sizes: tuple[int, ...]
  parent: np.ndarray
  depth: np.ndarray
  ancestors: np.ndarray

  @property
  def num_nodes(self) -> int:
    return int(self.parent.shape[0])

  def level(self, d: int) -> slice:
    """The nodes at depth d (1-based) as a slice."""
    start = sum(self.level_sizes[:d - 1])
    return slice(start, start + self.level_sizes[d - 1])


def validate(branching) -> tuple[int, ...]:
  """branching as a tuple of ints >= 1; ValueError('tree spec malformed: ...') otherwise."""
  try:
    spec = tuple(branching)
  except TypeError:
    raise ValueError(f"tree spec malformed: branching must be a sequence of ints >= 1 (children "
                     f"per node at each depth, e.g. (2, 2, 1)), got {branching!r}") from None
  if not spec:
    raise ValueError("tree spec malformed: branching is empty; give children per node at each "
                     "depth, e.g. (2, 2, 1)")
  bad = [b for b in spec if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 1]
  if bad:
    raise ValueError(f"tree spec malformed: every branching factor must be an int >= 1, got "
                     f"{spec!r} (bad: {bad!r})")
  return tuple(int(b) for b in spec)


@functools.cache
def static_tree(branching: tuple[int, ...]) -> StaticTree:
  """The `StaticTree` of a (validated) branching tuple."""
  branching = validate(branching)
  sizes = tuple(int(np.prod(branching[:d + 1])) for d in range(len(branching)))
  starts = np.cumsum((0,) + sizes)
  parent = np.concatenate([np.full(size, -1) if d == 0 else starts[d - 1] + np.arange(size) // b
                           for d, (size, b) in enumerate(zip(sizes, branching))])
  depth = np.concatenate([np.full(size, d + 1) for d, size in enumerate(sizes)])
  parent = np.asarray(parent, np.int32)
  ancestors = ancestor_mask(parent, len(branching))
  return StaticTree(branching, sizes, parent, np.asarray(depth, np.int32), ancestors)


def ancestor_mask(parent, max_depth: int):
  """[..., N, N] bool: node i sees node j iff j is i or an ancestor of i; parent [..., N] (-1:
  root). Works on numpy (static trees) and traced arrays (per-row dynamic trees)."""
  xp = np if isinstance(parent, np.ndarray) else jnp
  nodes = parent.shape[-1]
  index = xp.arange(nodes)
  mask = xp.broadcast_to(index[:, None] == index[None, :], parent.shape[:-1] + (nodes, nodes))
  current = xp.broadcast_to(index, parent.shape)
  for _ in range(max_depth - 1):
    current = xp.where(current >= 0,
                       xp.take_along_axis(parent, xp.clip(current, 0, None), axis=-1), -1)
    mask = mask | ((current[..., :, None] == index) & (current[..., :, None] >= 0))
  return mask


def feed_mask(ancestors, lead: int):
  """[..., lead + M, lead + M] bool for a call feeding `lead` committed tokens (causal among
  themselves) then M tree nodes, each seeing all lead tokens and its ancestors [..., M, M]."""
  xp = np if isinstance(ancestors, np.ndarray) else jnp
  batch, nodes = ancestors.shape[:-2], ancestors.shape[-1]
  top = xp.broadcast_to(np.concatenate([np.tril(np.ones((lead, lead), bool)),
                                        np.zeros((lead, nodes), bool)], axis=1),
                        batch + (lead, lead + nodes))
  bottom = xp.concatenate([xp.ones(batch + (nodes, lead), bool), ancestors], axis=-1)
  return xp.concatenate([top, bottom], axis=-2)

"""Cache slot compaction for any protocol cache: copies an accepted tree path's entries into
consecutive slots (SpecInfer, Miao et al. 2024: the verified tree's KV is kept, only the accepted
branch survives).

Samplers cannot import `models`, so the row and slot axes of each cache leaf are found from the
model itself: `jax.eval_shape` of `init_cache` with one more row and with one slot fewer (no
computation). Leaves without a slot axis (the length pointers) are left alone; the caller sets
the pointers. Guarantee: after `compact`, slot start[b] + k of every layer holds exactly what slot
slot_index[b, k] held before, so later calls attend to the path as if it had been fed in order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from samplers.core.protocol import Cache, CausalModel


def _changed_axis(a, b) -> int | None:
  diff = [i for i, (x, y) in enumerate(zip(a.shape, b.shape)) if x != y]
  return diff[0] if len(diff) == 1 else None


def cache_axes(model: CausalModel, batch: int, slots: int) -> list[tuple[int, int] | None]:
  """Per flattened cache leaf: (row axis, slot axis), or None when it has no slot axis."""
  shapes = [jax.tree.leaves(jax.eval_shape(lambda b=b, s=s: model.init_cache(b, s)))
            for b, s in ((batch, slots), (batch + 1, slots), (batch, slots - 1))]
  axes = []
  for base, rows, fewer in zip(*shapes):
    row, slot = _changed_axis(base, rows), _changed_axis(base, fewer)
    axes.append(None if row is None or slot is None else (row, slot))
  return axes


def compact(model: CausalModel, cache: Cache, slots: int, slot_index: jax.Array,
            start: jax.Array) -> Cache:
  """Copies slot slot_index[b, k] to slot start[b] + k for every row b and k < K.

  All reads happen before any write, so source and destination ranges may overlap; writes past
  the last slot are dropped. Lengths are unchanged.

  Args:
    model: the model whose `init_cache(B, slots)` made `cache`.
    cache: its cache; each leaf with a slot axis is [..., B, ..., S, ...] with S = slots.
    slot_index: [B, K] int32 source slots; start: [B] int32 first destination slot.
  """
  leaves, treedef = jax.tree.flatten(cache)
  batch = slot_index.shape[0]
  axes = cache_axes(model, batch, slots)
  dest = start[:, None] + jnp.arange(slot_index.shape[1], dtype=jnp.int32)[None, :]  # [B, K]
  rows = jnp.broadcast_to(jnp.arange(batch)[:, None], dest.shape)
  out = []
  for leaf, a in zip(leaves, axes):
    if a is None:
      out.append(leaf)
      continue
    row_axis, slot_axis = a
    def at(row_index, slot_index_):  # indexes rows and slots in place, no transpose of the cache
      index = [slice(None)] * leaf.ndim
      index[row_axis], index[slot_axis] = row_index, slot_index_
      return tuple(index)
    # Both index arrays are [B, K], so the picked entries are [B, K, <other axes>] either way.
    picked = leaf[at(rows, jnp.clip(slot_index, 0, leaf.shape[slot_axis] - 1))]
    out.append(leaf.at[at(rows, dest)].set(picked, mode="drop"))
  return jax.tree.unflatten(treedef, out)

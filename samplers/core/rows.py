"""Model calls over per-row caches that carry an explicit leading row axis.

A model's own batched cache puts the batch axis wherever the model likes (the Llama KV cache has
it second), so a sampler cannot copy one row's cache into another. Here every row owns a
batch-1 cache and calls are vmapped over rows: every leaf of a row cache is [R, ...] with the
row axis first, whatever the model, so rows can be repeated (one copy per draft) and selected
(keep the copy whose draft was accepted) with plain indexing. The compiled calls are batched as
usual; only the bookkeeping changes.

Sharding: on a mesh with logical axis rules (`parallelism.rules.activate`) the row axis takes the
place of the model's "batch" axis. `call` vmaps with `spmd_axis_name` = the mesh axes of "batch"
(e.g. ('data', 'fsdp')), and inside the row call "batch" (and any rule naming those mesh axes)
maps to no mesh axis, so the model's own `nn.with_logical_constraint`s shard the rows, its
activations and the row caches over 'data' as a batched call would; `keep_copy` selects within
each row's own copies, so it stays local to the devices holding them. Outside a mesh nothing
changes.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from samplers.core.protocol import Cache, CausalModel


def init(model: CausalModel, rows: int, max_len: int) -> Cache:
  """R empty batch-1 caches of `max_len` slots; leaves [R, ...], lengths [R, 1]."""
  return jax.tree.map(lambda leaf: jnp.broadcast_to(leaf, (rows,) + leaf.shape),
                      model.init_cache(1, max_len))


def _row_mesh_axes() -> tuple[str, ...] | None:
  """The mesh axes the active logical rules give "batch" (those in the active mesh), or None
  outside a mesh or when "batch" is not sharded."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None
  spec = nn.logical_to_mesh_axes(("batch",))
  axes = () if spec is None or spec[0] is None else spec[0]
  axes = tuple(a for a in ((axes,) if isinstance(axes, str) else axes) if a in mesh.axis_names)
  return axes or None


def call(method, params: Any, tokens: jax.Array, positions: jax.Array,
         caches: Cache) -> tuple[jax.Array, Cache]:
  """`method(params, tokens, positions, cache)` (a model's apply or prefill) once per row.

  Args:
    tokens, positions: [R, T] int32.
    caches: R row caches (see `init`).
  Returns:
    ([R, T, V] logits, the R row caches advanced by T); on a mesh with logical rules the row
    axis is sharded like a batch (see the module docstring).
  """
  def one(row_tokens, row_positions, cache):
    logits, cache = method(params, row_tokens[None], row_positions[None], cache)
    return logits[0], cache

  axes = _row_mesh_axes()
  if axes is None:
    return jax.vmap(one)(tokens, positions, caches)

  def free(mesh_axes):  # a rule's mesh axes without the row axes (None when none is left)
    names = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes or ())
    return tuple(n for n in names if n not in axes) or None

  row_rules = tuple((name, free(mesh_axes)) for name, mesh_axes in nn.get_logical_axis_rules())
  with nn.logical_axis_rules(row_rules):
    return jax.vmap(one, spmd_axis_name=axes)(tokens, positions, caches)


def set_lengths(caches: Cache, lengths: jax.Array) -> Cache:
  """Moves each row's pointer to lengths [R] (rollback)."""
  return caches.replace(lengths=lengths[:, None].astype(jnp.int32))


def repeat(caches: Cache, copies: int) -> Cache:
  """R row caches -> R * copies; row r's copies are rows r * copies ... r * copies + copies - 1."""
  return jax.tree.map(lambda leaf: jnp.repeat(leaf, copies, axis=0), caches)


def keep_copy(caches: Cache, chosen: jax.Array) -> Cache:
  """R * copies row caches (as made by `repeat`) -> R: row r keeps its copy chosen[r] ([R] int32).

  A gather within each row's own copies (not over all rows), so on a mesh it needs no
  communication between the devices holding different rows."""
  def one(leaf):
    grouped = leaf.reshape((chosen.shape[0], -1) + leaf.shape[1:])  # [R, copies, ...]
    index = chosen.astype(jnp.int32).reshape((-1, 1) + (1,) * (leaf.ndim - 1))
    return jnp.take_along_axis(grouped, index, axis=1)[:, 0]

  return jax.tree.map(one, caches)

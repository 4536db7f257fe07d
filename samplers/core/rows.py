"""Model calls over per-row caches that carry an explicit leading row axis.

A model's own batched cache puts the batch axis wherever the model likes (the Llama KV cache has
it second), so a sampler cannot copy one row's cache into another. Here every row owns a
batch-1 cache and calls are vmapped over rows: every leaf of a row cache is [R, ...] with the
row axis first, whatever the model, so rows can be repeated (one copy per draft) and selected
(keep the copy whose draft was accepted) with plain indexing. The compiled calls are batched as
usual; only the bookkeeping changes.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from samplers.core.protocol import Cache, CausalModel


def init(model: CausalModel, rows: int, max_len: int) -> Cache:
  """R empty batch-1 caches of `max_len` slots; leaves [R, ...], lengths [R, 1]."""
  return jax.tree.map(lambda leaf: jnp.broadcast_to(leaf, (rows,) + leaf.shape),
                      model.init_cache(1, max_len))


def call(method, params: Any, tokens: jax.Array, positions: jax.Array,
         caches: Cache) -> tuple[jax.Array, Cache]:
  """`method(params, tokens, positions, cache)` (a model's apply or prefill) once per row.

  Args:
    tokens, positions: [R, T] int32.
    caches: R row caches (see `init`).
  Returns:
    ([R, T, V] logits, the R row caches advanced by T).
  """
  def one(row_tokens, row_positions, cache):
    logits, cache = method(params, row_tokens[None], row_positions[None], cache)
    return logits[0], cache

  return jax.vmap(one)(tokens, positions, caches)


def set_lengths(caches: Cache, lengths: jax.Array) -> Cache:
  """Moves each row's pointer to lengths [R] (rollback)."""
  return caches.replace(lengths=lengths[:, None].astype(jnp.int32))


def repeat(caches: Cache, copies: int) -> Cache:
  """R row caches -> R * copies; row r's copies are rows r * copies ... r * copies + copies - 1."""
  return jax.tree.map(lambda leaf: jnp.repeat(leaf, copies, axis=0), caches)


def take(caches: Cache, index: jax.Array) -> Cache:
  """The row caches at index [R'] int32."""
  return jax.tree.map(lambda leaf: leaf[index], caches)

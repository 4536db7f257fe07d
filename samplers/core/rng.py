"""Per-row, per-position randomness, so that samples do not depend on batch composition.

A row's token at absolute position t is drawn with `fold_in(row_key, t)`: the same row with the
same key gives the same tokens whatever else is in the batch and however many tokens a step emits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def row_keys(key: jax.Array, batch: int) -> jax.Array:
  """Normalises a sampler's `key` argument to [B] typed keys.

  Args:
    key: one key (typed [] or raw uint32 [2]), split into one key per row; or one key per row
      (typed [B] or raw [B, 2]), used as is. Only per-row keys make a row's samples independent
      of its index in the batch.
    batch: B.
  """
  if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(key)
  if key.ndim == 0:
    return jax.random.split(key, batch)
  if key.shape != (batch,):
    raise ValueError(f"key must be one key or one key per row ({batch} rows); got key shape "
                     f"{key.shape} (typed keys) for a batch of {batch}")
  return key


def position_keys(keys: jax.Array, positions: jax.Array) -> jax.Array:
  """keys [B] typed, positions [B] int32 -> [B] keys for the tokens at those absolute positions."""
  return jax.vmap(jax.random.fold_in)(keys, positions)

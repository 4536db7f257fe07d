"""Key/value cache of the causal decoder: per-row write pointers, rollback and slot compaction.

Every row of a batch owns `lengths[b]` valid slots; a cached call attends to those slots plus its
new tokens, then writes the new tokens' keys/values at slots `lengths[b] + i` and advances the
pointer. Moving the pointer back (`cache.replace(lengths=...)`)
is a rollback: stale slots past the pointer are never attended to and are overwritten later. Slot
index and position id are independent, so a token tree can occupy consecutive slots while its
tokens carry the positions of their depth.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec


@flax.struct.dataclass
class KVCache:
  """Stacked per-layer keys and values with one write pointer per row.

  Attributes:
    keys: [L, B, S, KVH, D] rotated keys of every layer, compute dtype.
    values: [L, B, S, KVH, D] values of every layer, compute dtype.
    lengths: [B] int32 number of valid slots per row.
  """

  keys: jax.Array
  values: jax.Array
  lengths: jax.Array

  @property
  def max_len(self) -> int:
    """S, the number of slots per row."""
    return self.keys.shape[2]

  @classmethod
  def zeros(cls, num_layers: int, batch: int, max_len: int, num_kv_heads: int, head_dim: int,
            dtype) -> KVCache:
    """An empty cache: all rows at length 0."""
    shape = (num_layers, batch, max_len, num_kv_heads, head_dim)
    return cls(keys=jnp.zeros(shape, dtype), values=jnp.zeros(shape, dtype),
               lengths=jnp.zeros((batch,), jnp.int32))

  @staticmethod
  def logical_axes() -> KVCache:
    """Logical axis names of each field, as a KVCache of PartitionSpecs (for jit shardings)."""
    kv = PartitionSpec(None, "batch", "cache_length", "kv_heads", "head_dim")
    return KVCache(keys=kv, values=kv, lengths=PartitionSpec("batch"))


def write_rows(buffer: jax.Array, update: jax.Array, start: jax.Array) -> jax.Array:
  """Writes `update[b, i]` into `buffer[b, start[b] + i]` for every row at once.

  Args:
    buffer: [B, S, ...] destination.
    update: [B, T, ...] rows to write; cast to buffer's dtype.
    start: [B] int32 first slot per row.
  Returns:
    [B, S, ...] the updated buffer. Slots past S are dropped, not clamped, so an overflowing
    write never lands on a valid slot.
  """
  batch, steps = update.shape[:2]
  slots = start[:, None] + jnp.arange(steps, dtype=jnp.int32)[None, :]
  rows = jnp.broadcast_to(jnp.arange(batch)[:, None], slots.shape)
  return buffer.at[rows, slots].set(update.astype(buffer.dtype), mode="drop")


def gather_slots(cache: KVCache, slot_index: jax.Array, start: jax.Array) -> KVCache:
  """Copies selected slots of every layer to consecutive slots (compacts an accepted tree path).

  For each row b and k < K, slot `slot_index[b, k]` is copied to slot `start[b] + k` (all reads
  happen before any write, so source and destination ranges may overlap). Lengths are left as
  they are: the caller sets them, e.g. to `start + accepted_count`.

  Args:
    cache: the cache to compact.
    slot_index: [B, K] int32 source slots per row.
    start: [B] int32 first destination slot per row.
  """

  def move(buffer):  # [L, B, S, KVH, D]
    picked = jax.vmap(lambda rows, idx: jnp.take(rows, idx, axis=1, mode="clip"),
                      in_axes=(1, 0), out_axes=1)(buffer, slot_index)
    return jax.vmap(write_rows, in_axes=(0, 0, None))(buffer, picked, start)

  return cache.replace(keys=move(cache.keys), values=move(cache.values))

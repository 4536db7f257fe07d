"""Key/value cache of the causal decoder: per-row write pointers, rollback and slot compaction.

Every row of a batch owns `lengths[b]` valid slots; a cached call writes its new tokens'
keys/values at slots `lengths[b] + i`, attends to the slots below the pointer plus its new tokens,
and advances the pointer. Moving the pointer back (`cache.replace(lengths=...)`) is a rollback:
stale slots past the pointer are never attended to and are overwritten later. Slot index and
position id are independent, so a token tree can occupy consecutive slots while its tokens carry
the positions of their depth.

Layout, chosen for the decode step's speed (see docs/engine.md):

* one [B, KVH, S, D] buffer per layer (a tuple, not one stacked [L, ...] array), so a layer's
  attention reads its buffer in place: slicing a layer out of a stacked array inside the decode
  loop costs XLA a copy of that layer's whole cache per step;
* kv heads before slots, so the attention scores are a plain batched matmul over (row, kv head)
  with the slots contiguous, with no transpose of the cache.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec


@flax.struct.dataclass
class KVCache:
  """Per-layer keys and values with one write pointer per row.

  Attributes:
    keys: L buffers [B, KVH, S, D] of rotated keys, compute dtype.
    values: L buffers [B, KVH, S, D] of values, compute dtype.
    lengths: [B] int32 number of valid slots per row.
  """

  keys: tuple[jax.Array, ...]
  values: tuple[jax.Array, ...]
  lengths: jax.Array

  @property
  def max_len(self) -> int:
    """S, the number of slots per row."""
    return self.keys[0].shape[2]

  @property
  def num_layers(self) -> int:
    return len(self.keys)

  @classmethod
  def zeros(cls, num_layers: int, batch: int, max_len: int, num_kv_heads: int, head_dim: int,
            dtype) -> KVCache:
    """An empty cache: all rows at length 0."""
    shape = (batch, num_kv_heads, max_len, head_dim)
    return cls(keys=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
               values=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
               lengths=jnp.zeros((batch,), jnp.int32))

  @staticmethod
  def logical_axes(num_layers: int) -> KVCache:
    """Logical axis names of each field, as a KVCache of PartitionSpecs (for jit shardings)."""
    kv = tuple(PartitionSpec("batch", "kv_heads", "cache_length", "head_dim")
               for _ in range(num_layers))
    return KVCache(keys=kv, values=kv, lengths=PartitionSpec("batch"))


def write_rows(buffer: jax.Array, update: jax.Array, start: jax.Array) -> jax.Array:
  """Writes `update[b, i]` into `buffer[b, start[b] + i]` for every row at once.

  Args:
    buffer: [B, S, ...] destination.
    update: [B, T, ...] rows to write; cast to buffer's dtype.
    start: [B] int32 first slot per row.
  Returns:
    [B, S, ...] the updated buffer. Slots past S are dropped, not clamped, so an overflowing
    write never lands on a valid slot. One in-place scatter of B * T rows.
  """
  batch, steps = update.shape[:2]
  slots = start[:, None] + jnp.arange(steps, dtype=jnp.int32)[None, :]
  rows = jnp.broadcast_to(jnp.arange(batch)[:, None], slots.shape)
  return buffer.at[rows, slots].set(update.astype(buffer.dtype), mode="drop")


def write_slots(buffer: jax.Array, update: jax.Array, start: jax.Array) -> jax.Array:
  """A layer's new keys or values into its buffer: `buffer[b, :, start[b] + i] = update[b, i]`.

  Args:
    buffer: [B, KVH, S, D] a layer's cache buffer.
    update: [B, T, KVH, D] the new tokens' keys or values (the attention's layout).
    start: [B] int32 first slot per row.
  Returns:
    [B, KVH, S, D]; writes past S are dropped.
  """
  batch, steps = update.shape[:2]
  slots = start[:, None] + jnp.arange(steps, dtype=jnp.int32)[None, :]
  rows = jnp.broadcast_to(jnp.arange(batch)[:, None], slots.shape)
  # Advanced indices around a slice: the indexed dims come first, so the update is [B, T, KVH, D].
  return buffer.at[rows, :, slots, :].set(update.astype(buffer.dtype), mode="drop")


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

  def move(buffer):  # [B, KVH, S, D]
    picked = jnp.take_along_axis(buffer, slot_index[:, None, :, None], axis=2, mode="clip")
    return write_slots(buffer, jnp.moveaxis(picked, 1, 2), start)

  return cache.replace(keys=tuple(move(b) for b in cache.keys),
                       values=tuple(move(b) for b in cache.values))

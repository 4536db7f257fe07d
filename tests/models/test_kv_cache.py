"""KVCache slot operations against plain numpy loops."""

import jax
import jax.numpy as jnp
import numpy as np

from models.kv_cache import KVCache, gather_slots, write_rows, write_slots


def _cache(layers=2, batch=2, slots=6):
  """Slot contents encode (layer, row, slot) so that every move is visible."""
  keys = np.arange(layers * batch * slots, dtype=np.float32).reshape(layers, batch, 1, slots, 1)
  return KVCache(keys=tuple(jnp.asarray(k) for k in keys),
                 values=tuple(jnp.asarray(-k) for k in keys),
                 lengths=jnp.full((batch,), slots, jnp.int32))


def test_write_rows_uses_per_row_offsets_and_drops_overflow():
  buffer = jnp.zeros((2, 5), jnp.int32)
  update = jnp.array([[1, 2, 3], [4, 5, 6]], jnp.int32)
  out = write_rows(buffer, update, jnp.array([0, 3], jnp.int32))
  np.testing.assert_array_equal(out, [[1, 2, 3, 0, 0], [0, 0, 0, 4, 5]])


def test_write_slots_puts_each_token_at_its_rows_slot_for_every_head():
  rng = np.random.default_rng(0)
  buffer = rng.normal(size=(2, 3, 6, 4)).astype(np.float32)  # [B, KVH, S, D]
  update = rng.normal(size=(2, 2, 3, 4)).astype(np.float32)  # [B, T, KVH, D]
  start = np.array([1, 5])
  out = np.asarray(write_slots(jnp.asarray(buffer), jnp.asarray(update), jnp.asarray(start)))
  expected = buffer.copy()
  for b in range(2):
    for i in range(2):
      if start[b] + i < 6:  # past the last slot: dropped
        expected[b, :, start[b] + i] = update[b, i]
  np.testing.assert_array_equal(out, expected)


def test_gather_slots_copies_to_consecutive_slots():
  cache = _cache()
  slot_index = np.array([[3, 5], [1, 1]])
  start = np.array([2, 0])
  out = gather_slots(cache, jnp.asarray(slot_index, jnp.int32), jnp.asarray(start, jnp.int32))
  for layer in range(2):
    before = np.array(cache.keys[layer])
    expected = before.copy()
    for b in range(2):
      for k in range(2):
        expected[b, :, start[b] + k] = before[b, :, slot_index[b, k]]
    np.testing.assert_array_equal(out.keys[layer], expected)
    np.testing.assert_array_equal(out.values[layer], -expected)
  np.testing.assert_array_equal(out.lengths, cache.lengths)  # left to the caller


def test_gather_slots_reads_before_writing_overlapping_ranges():
  cache = _cache(layers=1, batch=1, slots=4)
  out = gather_slots(cache, jnp.array([[1, 3]], jnp.int32), jnp.array([0], jnp.int32))
  np.testing.assert_array_equal(out.keys[0][0, 0, :, 0], [1, 3, 2, 3])


def test_logical_axes_match_the_cache_structure():
  cache = KVCache.zeros(2, 3, 4, 1, 8, jnp.float32)
  axes = KVCache.logical_axes(2)
  is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
  assert jax.tree.structure(axes, is_leaf=is_spec) == jax.tree.structure(cache)
  for spec, leaf in zip(jax.tree.leaves(axes, is_leaf=is_spec), jax.tree.leaves(cache)):
    assert len(spec) == leaf.ndim

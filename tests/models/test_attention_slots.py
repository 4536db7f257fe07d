"""Decode attention over a layer's cache buffers (new tokens written first) against a loop."""

import jax.numpy as jnp
import numpy as np

from models import attention
from models.kv_cache import write_slots


def test_visible_slots_equals_the_rule_per_slot():
  rng = np.random.default_rng(0)
  lengths = np.array([0, 3, 5])
  mask = rng.random((3, 4, 4)) < 0.5
  got = np.asarray(attention.visible_slots(jnp.asarray(lengths), jnp.asarray(mask), 10))
  for b in range(3):
    for i in range(4):
      for s in range(10):
        j = s - lengths[b]
        want = s < lengths[b] or (0 <= j < 4 and mask[b, i, j])
        assert got[b, i, s] == want


def test_attend_slots_equals_attend_over_cache_and_new_tokens():
  """Writing first and attending under one mask = the cache's scores and the new tokens' scores
  in one softmax (`attend`), with grouped-query heads."""
  rng = np.random.default_rng(1)
  batch, steps, heads, kv_heads, dim, slots = 2, 3, 4, 2, 8, 9
  q = jnp.asarray(rng.normal(size=(batch, steps, heads, dim)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(batch, steps, kv_heads, dim)), jnp.float32)
          for _ in range(2))
  cache_k, cache_v = (jnp.asarray(rng.normal(size=(batch, kv_heads, slots, dim)), jnp.float32)
                      for _ in range(2))
  lengths = jnp.asarray([2, 5], jnp.int32)
  mask = jnp.asarray(rng.random((batch, steps, steps)) < 0.6) | jnp.eye(steps, dtype=bool)
  valid = jnp.arange(slots)[None, :] < lengths[:, None]
  want = attention.attend(q, k, v, mask, cache_k, cache_v, valid)
  written_k, written_v = write_slots(cache_k, k, lengths), write_slots(cache_v, v, lengths)
  got = attention.attend_slots(q, written_k, written_v,
                               attention.visible_slots(lengths, mask, slots))
  np.testing.assert_allclose(got, want, atol=1e-5)

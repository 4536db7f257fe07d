"""Entropy-switched decoding on tabular models: the reductions to one model's AR samples (exact),
the large model's cache catch-up, and mismatched vocabularies."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from samplers import ar, entropy_switch
from tests.samplers import toy

V = 6
MODEL = toy.TrigramLM(vocab_size=V, max_len=40)
PROMPTS = ar.pad_prompts([[1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1], [3]])


@pytest.fixture(scope="module")
def tables():
  return MODEL.init(jax.random.key(1)), MODEL.init(jax.random.key(2))


def test_mismatched_vocabulary_is_a_clear_error(tables):
  other = toy.TrigramLM(vocab_size=V + 1, max_len=40)
  with pytest.raises(ValueError, match="large model's vocab_size 7"):
    entropy_switch.sample(MODEL, tables[0], other, jnp.zeros((V + 1,) * 3), *PROMPTS,
                          jax.random.key(0), entropy_switch.EntropySwitchConfig(max_new_tokens=4))


@pytest.mark.parametrize("threshold", [-1.0, float("inf")])
def test_switch_extremes_are_one_model(tables, threshold):
  """Always large = the large model's AR samples; never = the small model's (same key, T=1)."""
  config = entropy_switch.EntropySwitchConfig(max_new_tokens=20, threshold=threshold, eos_id=5,
                                              sync_every=4)
  out = entropy_switch.sample(MODEL, tables[0], MODEL, tables[1], *PROMPTS, jax.random.key(3),
                              config)
  alone = ar.sample(MODEL, tables[1] if threshold < 0 else tables[0], *PROMPTS,
                    jax.random.key(3), ar.ARConfig(max_new_tokens=20, eos_id=5))
  np.testing.assert_array_equal(out.tokens, alone.tokens)
  assert float(out.stats["large_fraction"]) == (1.0 if threshold < 0 else 0.0)


def test_switch_cache_catch_up(tables):
  """With the large model equal to the small one, switching must not change the samples: the
  large model's lagging cache (caught up through W-token windows) reads the right context."""
  config = entropy_switch.EntropySwitchConfig(max_new_tokens=24, threshold=1.45, window=2,
                                              sync_every=3)
  out = entropy_switch.sample(MODEL, tables[0], MODEL, tables[0], *PROMPTS, jax.random.key(4),
                              config)
  alone = ar.sample(MODEL, tables[0], *PROMPTS, jax.random.key(4), ar.ARConfig(max_new_tokens=24))
  np.testing.assert_array_equal(out.tokens, alone.tokens)
  fraction = float(out.stats["large_fraction"])
  assert 0.1 < fraction < 0.9, fraction
  assert int(out.stats["large_calls"]) < int(out.stats["small_calls"])

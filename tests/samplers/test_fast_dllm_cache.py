"""Fast-dLLM's approximate caches of block decoding (`block_diffusion`, cache "prefix" and "dual")
on small bidirectional MDLMs with random weights.

The caches are approximations, so the oracle is the cases where they are exact: a one-layer model
(its keys and values depend on their own token only, and a cached token does not change inside a
block) and a block decoded in one step (its only step is the refresh). There the cached result
must equal cache-free block decoding token for token; a dual cache whose block does not see the
suffix is caught.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.build import build_model
from models.config import DiffusionConfig, ModelConfig
from samplers import block_diffusion, unmask
from samplers.core.logits import SamplingParams

MASK = 31
SHAPE = dict(vocab_size=32, d_model=32, num_heads=4, num_kv_heads=2, mlp_dim=64, max_len=24,
             init_std=0.5, diffusion=DiffusionConfig(mask_id=MASK))
RULES = {"k=1, greedy": unmask.UnmaskConfig(k=1),
         "tau=0.2, T=1": unmask.UnmaskConfig("threshold", threshold=0.2,
                                             sampling=SamplingParams(temperature=1.0))}


def denoiser(layers: int):
  model = build_model(ModelConfig(kind="mdlm", num_layers=layers, **SHAPE))
  return model, model.init(jax.random.key(layers))


def canvas() -> jax.Array:
  """[4, 24]: blocks of 4, the first a prompt in every row (no refresh), then prompts of
  several lengths, text after the masks (a suffix to see) and masks to the end."""
  m = MASK
  rows = [[1, 2, 3, 4] + [m] * 8 + [4, 5] + [m] * 6 + [6, 7, 8, 9],
          [8, 8, 8, 8] + [m] * 20,
          [5] * 9 + [m] * 11 + [2, 2, 2, 2],
          [7, 1, 2, 3] + [m] * 3 + [3] * 5 + [m] * 12]
  return jnp.asarray(rows, jnp.int32)


def decode(model, params, cache, rule, size=4, rows=None, refresh_every=0, fresh_window=0):
  tokens = canvas() if rows is None else canvas()[rows]
  keys = jax.random.split(jax.random.key(7), 4)
  keys = keys if rows is None else keys[rows]
  config = block_diffusion.BlockConfig(size, rule, cache, refresh_every, fresh_window)
  return block_diffusion.sample(model, params, tokens, keys, config)


@pytest.mark.parametrize("rule", RULES, ids=list(RULES))
@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_a_one_layer_model_decodes_as_without_the_cache(cache, rule):
  model, params = denoiser(1)
  free = decode(model, params, "none", RULES[rule])
  cached = decode(model, params, cache, RULES[rule])
  np.testing.assert_array_equal(cached.tokens, free.tokens)
  assert not np.any(np.asarray(cached.tokens) == MASK)
  np.testing.assert_array_equal(cached.stats["model_calls"], free.stats["model_calls"])
  assert int(cached.stats["refresh_calls"]) == 5  # the blocks with a mask in some row (of 6)


def test_one_step_per_block_decodes_as_without_the_cache():
  """With k = the block length the refresh is a block's only step: exact for any depth."""
  model, params = denoiser(3)
  rule = unmask.UnmaskConfig(k=4)
  free = decode(model, params, "none", rule)
  for cache in ("prefix", "dual"):
    np.testing.assert_array_equal(decode(model, params, cache, rule).tokens, free.tokens)


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_a_deep_model_reads_the_stale_cache(cache):
  """Three layers, one token per step: the cached keys miss the tokens committed since the
  refresh, so some row differs from cache-free decoding (a cache that recomputed everything
  would not)."""
  model, params = denoiser(3)
  rule = RULES["k=1, greedy"]
  free = np.asarray(decode(model, params, "none", rule).tokens)
  assert np.any(np.asarray(decode(model, params, cache, rule).tokens) != free)


@pytest.mark.parametrize("rule", RULES, ids=list(RULES))
@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_refreshing_every_step_decodes_as_without_the_cache_at_any_depth(cache, rule):
  """refresh_every=1: every step scores the whole canvas, so the three-layer model that reads
  stale keys once per block decodes exactly as cache-free; every call is a refresh."""
  model, params = denoiser(3)
  free = decode(model, params, "none", RULES[rule])
  cached = decode(model, params, cache, RULES[rule], refresh_every=1)
  np.testing.assert_array_equal(cached.tokens, free.tokens)
  assert int(cached.stats["refresh_calls"]) == int(cached.stats["model_calls"]) == int(
      free.stats["model_calls"])


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_refreshing_every_other_step_counts_its_refreshes(cache):
  """One token per step (k = 1): a block whose rows need s steps is refreshed ceil(s / 2) times;
  the canvas's five masked blocks need 4 steps each (a row with all four masked), so 10."""
  model, params = denoiser(3)
  out = decode(model, params, cache, RULES["k=1, greedy"], refresh_every=2)
  assert int(out.stats["model_calls"]) == 20 and int(out.stats["refresh_calls"]) == 10
  assert not np.any(np.asarray(out.tokens) == MASK)


def test_refresh_every_without_a_fast_dllm_cache_is_refused():
  with pytest.raises(ValueError, match="refresh_every=2 must be 0 .* with cache 'prefix' or "
                     "'dual' .got cache 'none'"):
    block_diffusion.BlockConfig(4, RULES["k=1, greedy"], "none", 2)
  with pytest.raises(ValueError, match="refresh_every=-1"):
    block_diffusion.BlockConfig(4, RULES["k=1, greedy"], "dual", -1)


@pytest.mark.parametrize("rule", RULES, ids=list(RULES))
def test_a_fresh_window_from_the_canvas_start_decodes_as_without_the_prefix_cache(rule):
  """fresh_window >= the canvas: every step recomputes the whole canvas, so the three-layer model
  that reads stale keys without it decodes exactly as cache-free, one refresh per block."""
  model, params = denoiser(3)
  free = decode(model, params, "none", RULES[rule])
  cached = decode(model, params, "prefix", RULES[rule], fresh_window=24)
  np.testing.assert_array_equal(cached.tokens, free.tokens)
  assert int(cached.stats["refresh_calls"]) == 5


@pytest.mark.parametrize("window", [4, 6])
@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_a_one_layer_model_with_a_fresh_window_decodes_as_without_the_cache(cache, window):
  """Partial windows (a block, and a block and a half) move the block within the recomputed
  slots; a one-layer model's keys depend on their own token only, so any slot mix-up shows."""
  model, params = denoiser(1)
  rule = RULES["k=1, greedy"]
  free = decode(model, params, "none", rule)
  cached = decode(model, params, cache, rule, fresh_window=window)
  np.testing.assert_array_equal(cached.tokens, free.tokens)


def test_a_fresh_window_without_a_fast_dllm_cache_is_refused():
  with pytest.raises(ValueError, match="fresh_window=8 must be 0 .* with cache 'prefix' or "
                     "'dual' .got cache 'exact'"):
    block_diffusion.BlockConfig(4, RULES["k=1, greedy"], "exact", fresh_window=8)
  with pytest.raises(ValueError, match="fresh_window=-1"):
    block_diffusion.BlockConfig(4, RULES["k=1, greedy"], "prefix", fresh_window=-1)


def test_a_dual_cache_whose_block_misses_the_suffix_is_caught(fresh_trace):
  model, params = denoiser(1)
  rule = RULES["k=1, greedy"]
  free = np.asarray(decode(model, params, "none", rule).tokens)
  fresh_trace.setattr(block_diffusion, "_refresh_order",
                      lambda cache, begin, start, size, length: (np.arange(length), start))
  broken = np.asarray(decode(model, params, "dual", rule).tokens)
  assert np.all(np.sum(broken != free, axis=1) >= 3)  # every row, 5-12 of its tokens


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_a_row_does_not_depend_on_its_batch(cache):
  """Deep model, sampled: the cache is approximate, yet a row's tokens are the same alone and in
  a batch whose rows finish their blocks after other numbers of steps."""
  model, params = denoiser(2)
  rule = RULES["tau=0.2, T=1"]
  batched = np.asarray(decode(model, params, cache, rule).tokens)
  for i in range(4):
    alone = decode(model, params, cache, rule, rows=np.array([i]))
    np.testing.assert_array_equal(alone.tokens[0], batched[i])

"""The EAGLE head: built from the config, the cached draft calls equal the cache-free head, the
loss trains only the head, and the trainer fits it on a frozen target that the eagle sampler then
decodes (greedy = AR) from Python and from the CLI."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.build import build_model
from models.config import DraftHeadsConfig, ModelConfig
from models.eagle import EagleLM
from paxlike import config as config_lib
from paxlike import registry
from paxlike.errors import UserError
from tests.models.frozen_target import check_heads_fit_and_decode
from tests.models.random_params import random_params

registry.load_modules()
CONFIG = ModelConfig(num_layers=1, d_model=16, num_heads=2, num_kv_heads=2, mlp_dim=32,
                     vocab_size=32, max_len=16, draft_heads=DraftHeadsConfig(eagle=True))


def test_features_are_what_the_logits_project_and_cached_drafts_equal_the_cache_free_head():
  model = build_model(CONFIG)
  assert isinstance(model, EagleLM)
  params = random_params(model)
  tokens = jax.random.randint(jax.random.key(1), (2, 10), 0, 32)
  logits, features = model.features(params, tokens)
  assert features.shape == (2, 10, 16)
  np.testing.assert_allclose(model.logits(params, tokens), logits, rtol=1e-5, atol=1e-5)
  cached_logits, cached_features, _ = model.apply_with_features(
      params, tokens, jnp.broadcast_to(jnp.arange(10), (2, 10)), model.init_cache(2))
  np.testing.assert_allclose(cached_features, features, rtol=1e-4, atol=1e-4)

  positions = jnp.broadcast_to(jnp.arange(9), (2, 9))
  whole, predicted, _ = model.module.apply({"params": params}, features[:, :-1], tokens[:, 1:],
                                           positions, method=model.module.draft)
  # the same pairs through the cache: 4 pairs, 3 garbage pairs rolled back, then the other 5
  cache = model.init_draft_cache(2)
  first, _, cache = model.draft(params, features[:, :4], tokens[:, 1:5], positions[:, :4], cache)
  _, _, cache = model.draft(params, 7.0 + features[:, :3], tokens[:, :3], positions[:, 4:7],
                            cache)
  rest, rest_predicted, cache = model.draft(params, features[:, 4:9], tokens[:, 5:10],
                                            positions[:, 4:9],
                                            cache.replace(lengths=cache.lengths - 3))
  np.testing.assert_allclose(jnp.concatenate([first, rest], axis=1), whole, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(rest_predicted, predicted[:, 4:], rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(cache.lengths, [9, 9])


def test_drafting_at_rows_equals_the_whole_call_at_those_rows():
  """`draft(..., rows=)` (the round's first head call: only the last pending pair is drafted
  from) writes the same cache and returns the whole call's outputs at those rows."""
  model = build_model(CONFIG)
  params = random_params(model)
  tokens = jax.random.randint(jax.random.key(5), (2, 7), 0, 32)
  _, features = model.features(params, tokens)
  positions = jnp.broadcast_to(jnp.arange(6), (2, 6)) + jnp.array([[0], [3]])
  cache = model.init_draft_cache(2).replace(lengths=jnp.array([0, 3]))
  whole, predicted, whole_cache = model.draft(params, features[:, :-1], tokens[:, 1:], positions,
                                              cache)
  rows = jnp.array([[5], [2]])
  some, some_predicted, some_cache = model.draft(params, features[:, :-1], tokens[:, 1:],
                                                 positions, cache, rows=rows)
  assert some.shape == (2, 1, 32) and some_predicted.shape == (2, 1, 16)
  np.testing.assert_allclose(some, jnp.take_along_axis(whole, rows[..., None], 1), rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(some_predicted, jnp.take_along_axis(predicted, rows[..., None], 1),
                             rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(some_cache), jax.tree.leaves(whole_cache)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="pass a cache and a mask"):
    model.module.apply({"params": params}, features[:, :-1], tokens[:, 1:], positions, None,
                       None, rows, method=model.module.draft)


def test_the_training_rollout_is_what_the_head_drafts_from_its_cache():
  """Step k of `rollout` at position t equals the k-th draft of the cached head after the
  verified pairs 0..t - k + 1, fed its own predicted features (the sampler's drafting loop)."""
  model = build_model(CONFIG)
  params = random_params(model)
  tokens = jax.random.randint(jax.random.key(3), (2, 9), 0, 32)
  _, features = model.features(params, tokens)
  pairs_f, pairs_x = features[:, :-1], tokens[:, 1:]
  logits, predicted = model.rollout(params, pairs_f, pairs_x, 3)
  positions = jnp.broadcast_to(jnp.arange(8), (2, 8))
  for verified in (0, 2, 4):  # the last verified pair's position
    out, feature, cache = model.draft(params, pairs_f[:, :verified + 1], pairs_x[:, :verified + 1],
                                      positions[:, :verified + 1], model.init_draft_cache(2))
    for k in range(1, 4):
      t = verified + k - 1
      np.testing.assert_allclose(out[:, -1], logits[k - 1][:, t], rtol=2e-4, atol=2e-4)
      np.testing.assert_allclose(feature[:, -1], predicted[k - 1][:, t], rtol=2e-4, atol=2e-4)
      if k < 3:
        out, feature, cache = model.draft(params, feature[:, -1:], pairs_x[:, t + 1:t + 2],
                                          positions[:, t + 1:t + 2], cache)


def test_only_the_head_gets_gradients_and_bad_settings_are_named():
  model = build_model(dataclasses.replace(CONFIG, draft_heads=DraftHeadsConfig(eagle=True,
                                                                              eagle_rollout=2)))
  params = random_params(model)
  batch = jax.random.randint(jax.random.key(2), (2, 9), 0, 32)
  grads, parts = jax.jit(jax.grad(lambda p: model.loss(p, batch, jax.random.key(0)),
                                  has_aux=True))(params)
  norms = {name: float(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(tree)))
           for name, tree in grads.items()}
  # the target's blocks see none (stopped features); its projection's are dropped by the
  # trainer's train.trainable=eagle
  assert norms.pop("eagle") > 0 and not any(v for k, v in norms.items() if k.startswith("blocks"))
  assert set(parts) == {"feature_loss", "cls_loss", "draft_top1", "draft_top1_2"}
  tiny = registry.get("tiny")
  with pytest.raises(UserError, match="set train.trainable=eagle"):
    config_lib.validate(config_lib.apply_overrides(tiny, ["model.draft_heads.eagle=true"]))
  with pytest.raises(ValueError, match="not several"):
    dataclasses.replace(CONFIG, draft_heads=DraftHeadsConfig(medusa=2, eagle=True)).validate()
  with pytest.raises(ValueError, match="eagle_rollout must be >= 1 step"):
    DraftHeadsConfig(eagle=True, eagle_rollout=0).validate("llama", 1)
  with pytest.raises(ValueError, match="eagle_mlp_dim must be >= 0"):
    DraftHeadsConfig(eagle=True, eagle_mlp_dim=-1).validate("llama", 1)


@pytest.mark.slow
def test_the_trainer_fits_the_head_on_a_frozen_target_and_the_sampler_uses_it(tmp_path):
  """target (3 steps) -> head (target frozen, 30 steps): the loss falls, the target's weights
  are untouched; greedy EAGLE decoding equals greedy AR, from Python and the CLI."""
  check_heads_fit_and_decode(tmp_path, "eagle", "model.draft_heads.eagle=true",
                             {"num_draft_tokens": 3}, ["num_draft_tokens=3"],
                             "a causal model with an EAGLE draft head")

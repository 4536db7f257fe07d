"""Diffusion-drafted speculative decoding: greedy equality with AR (a toy pair, and a Llama
target drafted by an MDLM denoiser), per-row randomness and bad input. Its exact target joint at
T = 1 over eight tokens, with a broken residual caught, is in test_long_oracle."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.build import build_model
from models.config import DiffusionConfig, ModelConfig
from paxlike import config as config_lib
from paxlike import generate
from paxlike.errors import UserError
from samplers import ar, diffusion_drafted
from samplers.core.logits import SamplingParams
from tests.models.random_params import random_params
from tests.samplers import oracle, toy
from tests.samplers.test_speculative import _successor
from tests.samplers.toy_drafters import NearestTokenDenoiser

GREEDY = SamplingParams(temperature=0.0)


@pytest.mark.parametrize("batch, drafter", [(1, "exact"), (8, "exact"), (3, "random"),
                                            (8, "random, window 2")])
def test_equals_greedy_ar_on_a_table_model(batch, drafter):
  """An `exact` denoiser knows the successor target (every draft passes), a `random` one mostly
  does not, and may see only the last 2 tokens; all give AR's tokens."""
  vocab = 8
  model = toy.TrigramLM(vocab_size=vocab, max_len=40)
  denoiser = NearestTokenDenoiser(vocab, 48, mask_id=vocab - 1)
  params = _successor(vocab) + 0.1 * jax.random.normal(jax.random.key(batch), (vocab,) * 3)
  if drafter == "exact":  # at distance d after token x: x + d
    d = jnp.arange(6)
    guess = jax.nn.one_hot((jnp.arange(vocab)[:, None] + d[None, :]) % vocab, vocab)
    denoiser_params = 8.0 * guess
  else:
    denoiser_params = denoiser.random_params(jax.random.key(batch + 7), depth=6)
  rng = np.random.default_rng(batch)
  padded = ar.pad_prompts([rng.integers(0, vocab - 1, rng.integers(1, 6)).tolist()
                           for _ in range(batch)])
  expected = ar.sample(model, params, *padded, jax.random.key(0),
                       ar.ARConfig(max_new_tokens=16, sampling=GREEDY))
  config = diffusion_drafted.DiffusionDraftedConfig(
      num_draft_tokens=4, max_new_tokens=16, sampling=GREEDY,
      context_window=2 if drafter.endswith("window 2") else 0)
  got = diffusion_drafted.sample(model, params, denoiser, denoiser_params, *padded,
                                 jax.random.key(0), config)
  np.testing.assert_array_equal(got.tokens, expected.tokens)
  stats = {k: float(v) for k, v in got.stats.items()}
  assert stats["draft_calls"] == stats["target_calls"]
  if drafter == "exact" and batch == 1:
    assert stats["tokens_per_target_call"] > 2.5, stats


def test_equals_greedy_ar_with_a_llama_target_and_an_mdlm_drafter():
  shape = dict(vocab_size=32, d_model=32, num_heads=4, num_kv_heads=2, mlp_dim=64, max_len=48,
               init_std=0.5, tie_embeddings=False)
  target = build_model(ModelConfig(num_layers=2, **shape))
  denoiser = build_model(ModelConfig(kind="mdlm", num_layers=1,
                                     diffusion=DiffusionConfig(mask_id=31), **shape))
  target_params, denoiser_params = random_params(target), random_params(denoiser, seed=1)
  prompts = [[1, 2, 3, 4, 5], [7, 8], [3, 3, 3, 1], [9]]
  padded = ar.pad_prompts(prompts)
  expected = ar.sample(target, target_params, *padded, jax.random.key(0),
                       ar.ARConfig(max_new_tokens=16, sampling=GREEDY))
  got = diffusion_drafted.sample(
      target, target_params, denoiser, denoiser_params, *padded, jax.random.key(0),
      diffusion_drafted.DiffusionDraftedConfig(num_draft_tokens=3, max_new_tokens=16,
                                               sampling=GREEDY))
  mismatched = np.flatnonzero(np.any(np.asarray(got.tokens != expected.tokens), axis=1))
  assert mismatched.size <= 1, mismatched  # a float near-tie at most


def test_rows_follow_their_keys_whatever_the_batch_order_and_under_vmap():
  denoiser = NearestTokenDenoiser(toy.VOCAB, 24, mask_id=toy.VOCAB - 1)
  denoiser_params = denoiser.random_params(jax.random.key(2))
  prompt, lengths = ar.pad_prompts([[1, 2], [3], [0, 1, 2], [2, 2]])
  config = diffusion_drafted.DiffusionDraftedConfig(num_draft_tokens=3, max_new_tokens=6,
                                                    eos_id=0)
  run = lambda order, row_keys: diffusion_drafted.sample(
      toy.TOY, toy.TARGET, denoiser, denoiser_params, prompt[order], lengths[order], row_keys,
      config)
  oracle.assert_rows_follow_their_keys(run)


def test_bad_input_is_a_clear_error():
  prompt, lengths = ar.pad_prompts([[1, 2]])
  config = diffusion_drafted.DiffusionDraftedConfig(num_draft_tokens=3, max_new_tokens=4)
  with pytest.raises(ValueError, match="drafts with a masked-diffusion denoiser"):
    diffusion_drafted.sample(toy.TOY, toy.TARGET, toy.TOY, toy.TARGET, prompt, lengths,
                             jax.random.key(0), config)
  other = NearestTokenDenoiser(toy.VOCAB + 1, 24, mask_id=toy.VOCAB)
  with pytest.raises(ValueError, match="denoiser's vocab_size 6 differs"):
    diffusion_drafted.sample(toy.TOY, toy.TARGET, other, other.random_params(jax.random.key(0)),
                             prompt, lengths, jax.random.key(0), config)
  short = NearestTokenDenoiser(toy.VOCAB, 8, mask_id=toy.VOCAB - 1)
  with pytest.raises(ValueError, match=r"= 9 exceeds the denoiser's max_len 8"):
    diffusion_drafted.sample(toy.TOY, toy.TARGET, short, short.random_params(jax.random.key(0)),
                             prompt, lengths, jax.random.key(0), config)
  with pytest.raises(ValueError, match="num_draft_tokens"):
    diffusion_drafted.DiffusionDraftedConfig(num_draft_tokens=0, max_new_tokens=4)


def test_generate_runs_it_on_byte_models_and_names_a_wrong_second_model():
  shape = dict(d_model=32, num_heads=4, num_kv_heads=2, mlp_dim=64, max_len=64)
  target = build_model(ModelConfig(num_layers=1, **shape))
  denoiser = build_model(ModelConfig(kind="mdlm", num_layers=1, **shape))
  target_params, denoiser_params = random_params(target), random_params(denoiser, seed=1)
  prompt, lengths = generate.encode_prompts(["ROMEO:", "O"], 64)
  base = config_lib.SamplerConfig(max_new_tokens=12, temperature=0.0)
  ar_tokens, _, _ = generate.decode(target, target_params, prompt, lengths, base)
  drafted = config_lib.apply_overrides(config_lib.Experiment(sampler=base),
                                       ["sampler.kind=diffusion_drafted"]).sampler
  tokens, _, stats = generate.decode(target, target_params, prompt, lengths, drafted, denoiser,
                                     denoiser_params)
  np.testing.assert_array_equal(tokens, ar_tokens)
  assert stats["draft_calls"] == stats["target_calls"]
  with pytest.raises(UserError, match="needs a masked-diffusion model .* as its denoiser model"):
    generate.decode(target, target_params, prompt, lengths, drafted, target, target_params)


def test_a_windowed_denoiser_does_not_bound_the_generation():
  """The denoiser reads the row's last context_window tokens only, so a denoiser with a shorter
  max_len than prompt + generation drafts the whole generation (the target's max_len bounds it);
  without a window (context_window=0) its max_len bounds it as the other second models' do."""
  shape = dict(d_model=32, num_heads=4, num_kv_heads=2, mlp_dim=64)
  target = build_model(ModelConfig(num_layers=1, max_len=64, **shape))
  denoiser = build_model(ModelConfig(kind="mdlm", num_layers=1, max_len=16, **shape))
  target_params, denoiser_params = random_params(target), random_params(denoiser, seed=1)
  prompt, lengths = generate.encode_prompts(["ROMEO:", "O"], 64)
  base = config_lib.SamplerConfig(max_new_tokens=24, temperature=0.0)
  ar_tokens, _, _ = generate.decode(target, target_params, prompt, lengths, base)
  windowed = config_lib.apply_overrides(config_lib.Experiment(sampler=base), [
      "sampler.kind=diffusion_drafted", "sampler.context_window=8"]).sampler
  tokens, _, _ = generate.decode(target, target_params, prompt, lengths, windowed, denoiser,
                                 denoiser_params)
  np.testing.assert_array_equal(tokens, ar_tokens)  # all 24 tokens, past the denoiser's 16
  whole = dataclasses.replace(windowed, context_window=0)
  assert generate.bounding_max_len([whole], target, denoiser) == 16
  assert generate.bounding_max_len([windowed], target, denoiser) == 64

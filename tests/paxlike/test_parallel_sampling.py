"""sampler.num_samples / sampler.selection through generate.decode with the diffusion-style
(canvas) kinds: sample i of a prompt is the lone run with key fold_in(seed key, i), the
token-only selections pick among those samples, and the selections that need a causal model's
log-likelihood or AR decoding are clear errors naming the ones that work."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.build import build_model
from models.config import ModelConfig
from paxlike import generate, interchange
from paxlike.config import SamplerConfig
from paxlike.errors import UserError
from samplers import repeated, unmask
from samplers.core import canvas
from samplers.spec import Decode

SMALL = dict(num_layers=1, d_model=32, num_heads=2, num_kv_heads=2, mlp_dim=64, max_len=32)
N_NEW, SAMPLES = 6, 3


@pytest.fixture(scope="module")
def denoiser():
  model = build_model(ModelConfig(kind="mdlm", **SMALL))
  codec = interchange.text_codec(model.config)
  prompt, lengths = generate.encode_prompts(["ab", "cdef"], model.max_len, codec)
  return model, model.init(jax.random.key(0)), prompt, lengths


def _lone_run(model, params, prompt, lengths, cfg, key):
  """One decode of the prompts by unmask.sample with `key`, read back as generate does."""
  config = cfg.spec.build(cfg.options(), Decode(
      max_new_tokens=N_NEW, eos_id=interchange.BYTES.eos_id, pad_id=interchange.BYTES.pad_id,
      sampling=cfg.sampling()))
  data = canvas.from_prompts(jnp.asarray(prompt), jnp.asarray(lengths), N_NEW, model.mask_id,
                             interchange.BYTES.pad_id)
  out = unmask.sample(model, params, data, key, config)
  generated = np.asarray(canvas.generated(out.tokens, jnp.asarray(lengths), N_NEW))
  return generate._until_eos(generated, interchange.BYTES)


def test_canvas_kind_draws_n_samples_each_a_lone_run(denoiser):
  model, params, prompt, lengths = denoiser
  cfg = SamplerConfig(kind="unmask", rule="topk", k=2, max_new_tokens=N_NEW, temperature=1.0,
                      num_samples=SAMPLES, seed=3)
  tokens, counts, stats = generate.decode(model, params, prompt, lengths, cfg)
  assert tokens.shape == (2 * SAMPLES, N_NEW) and counts.shape == (2 * SAMPLES,)
  assert stats["num_samples"] == SAMPLES and stats["selection"] == "none"
  assert stats["model_calls"] == N_NEW // 2  # topk 2: 3 steps, every sample alike
  keys = repeated.sample_keys(jax.random.key(3), SAMPLES)
  for i in range(SAMPLES):
    lone_tokens, lone_counts = _lone_run(model, params, prompt, lengths, cfg, keys[i])
    np.testing.assert_array_equal(tokens[i::SAMPLES], lone_tokens)  # prompt-major rows
    np.testing.assert_array_equal(counts[i::SAMPLES], lone_counts)
  assert len({tuple(row) for row in tokens[:SAMPLES]}) > 1  # prompt 0's samples differ


@pytest.mark.parametrize("rule", ["majority", "mbr"])
def test_token_only_selections_pick_one_of_the_samples(denoiser, rule):
  model, params, prompt, lengths = denoiser
  cfg = SamplerConfig(kind="mdlm", steps=3, max_new_tokens=N_NEW, temperature=1.0,
                      num_samples=SAMPLES, selection=rule)
  tokens, counts, stats = generate.decode(model, params, prompt, lengths, cfg)
  every, every_counts, _ = generate.decode(model, params, prompt, lengths,
                                           dataclasses.replace(cfg, selection="none"))
  assert tokens.shape == (2, N_NEW) and len(stats["sample_index"]) == 2
  for b, index in enumerate(stats["sample_index"]):
    np.testing.assert_array_equal(tokens[b], every[b * SAMPLES + index])
    assert counts[b] == every_counts[b * SAMPLES + index]
  assert stats["model_calls"] == 3  # mdlm under vmap: every step's call ran


@pytest.mark.parametrize("rule", ["best_of_n", "first_finish", "reward_pruned"])
def test_selections_that_need_a_causal_model_are_refused_by_name(denoiser, rule):
  model, params, prompt, lengths = denoiser
  cfg = SamplerConfig(kind="unmask", max_new_tokens=N_NEW, num_samples=2, selection=rule)
  with pytest.raises(UserError, match=rf"sampler.selection={rule} needs a causal model's "
                                      r"log-likelihood or AR decoding; sampler.kind=unmask fills "
                                      r"a canvas: use sampler.selection=none, majority, mbr"):
    generate.decode(model, params, prompt, lengths, cfg)


def test_generate_returns_n_texts_per_prompt(denoiser):
  model, params, _, _ = denoiser
  cfg = SamplerConfig(kind="unmask", max_new_tokens=N_NEW, num_samples=2, temperature=1.0)
  texts, stats = generate.generate(model, params, ["ab", "c", "xyz"], cfg)
  assert len(texts) == 6 and stats["batch"] == 3 and stats["num_samples"] == 2

"""generate.decode with the diffusion-style sampler kinds on small untrained models (the samplers'
exactness is tested on tabular models in tests/samplers/test_diffusion_samplers.py)."""

import dataclasses

import jax
import numpy as np
import pytest

from models.build import build_model
from models.config import DiffusionConfig, ModelConfig
from paxlike import config as config_lib
from paxlike import generate
from paxlike.config import SamplerConfig
from paxlike.errors import UserError

SMALL = dict(num_layers=1, d_model=32, num_heads=2, num_kv_heads=2, mlp_dim=64, max_len=32)


def built(kind: str, **extra):
  model = build_model(ModelConfig(kind=kind, **SMALL, **extra))
  return model, model.init(jax.random.key(0))


def test_unmask_and_block_kinds_fill_the_generation_after_the_prompt():
  model, params = built("mdlm", diffusion=DiffusionConfig(block_size=8))
  prompts = ["ab", "abcdef"]
  cfg = SamplerConfig(kind="unmask", rule="topk", k=2, max_new_tokens=10,
                      temperature=0.0)
  texts, stats = generate.generate(model, params, prompts, cfg)
  assert len(texts) == 2 and stats["model_calls"] == 5 and stats["tokens_per_call"] == 2.0
  one_slot = dataclasses.replace(cfg, slots=1)  # continuous batching, a prompt per call
  slotted, slot_stats = generate.generate(model, params, prompts, one_slot)
  assert slotted == texts and slot_stats["model_calls"] == 10
  block = dataclasses.replace(cfg, kind="block", block_length=8)
  texts, stats = generate.generate(model, params, prompts, block)
  # canvas: 7 prompt positions (start token + 6 bytes, padded) + 9 tokens = 16, two whole blocks
  assert stats["generated_tokens"] == 2 * 9


def test_assd_kind_on_an_any_subset_model():
  model, params = built("asarm")
  cfg = SamplerConfig(kind="assd", num_draft_tokens=3, max_new_tokens=8, temperature=1.0)
  _, stats = generate.generate(model, params, ["x"], cfg)
  assert stats["generated_tokens"] == 8 and stats["model_calls"] <= 8
  reuse = dataclasses.replace(cfg, reuse_drafts=True)  # one call per round, one to start
  _, stats = generate.generate(model, params, ["x"], reuse)
  assert stats["generated_tokens"] == 8 and stats["model_calls"] == stats["rounds"] + 1


def test_bad_diffusion_input_is_a_clear_error():
  model, params = built("mdlm")
  prompt, lengths = np.array([[258, 97]], np.int32), np.array([2], np.int32)
  with pytest.raises(UserError, match="exceeds the 8 tokens generated"):
    generate.decode(model, params, prompt, lengths,
                    SamplerConfig(kind="mdlm", steps=9, max_new_tokens=8))
  with pytest.raises(UserError, match="contain the mask id 259"):
    generate.decode(model, params, np.array([[258, 259]], np.int32), lengths,
                    SamplerConfig(kind="unmask", max_new_tokens=8))
  with pytest.raises(UserError, match="needs a causal model"):
    generate.decode(model, params, prompt, lengths, SamplerConfig(kind="ar"))
  with pytest.raises(UserError, match="needs an any-subset AR model"):
    generate.decode(model, params, prompt, lengths, SamplerConfig(kind="assd"))
  with pytest.raises(UserError, match=r"needs a second model \(the energy model\)"):
    generate.decode(model, params, prompt, lengths, SamplerConfig(kind="edlm", steps=4,
                                                                  max_new_tokens=8))


def test_cached_block_decoding_of_a_bidirectional_model_is_a_clear_error():
  """Cached blocks are exact only for a block-causal model of the same blocks; the default
  cache=exact on a bidirectional MDLM is refused with the fixes; cache=none and Fast-dLLM's
  approximate caches decode."""
  model, params = built("mdlm")  # bidirectional: model.diffusion.block_size 0
  prompt, lengths = np.array([[258, 97]], np.int32), np.array([2], np.int32)
  cfg = SamplerConfig(kind="block", block_length=5, max_new_tokens=8)  # canvas: 2 blocks of 5
  with pytest.raises(UserError, match=r"this model is bidirectional \(block_size 0\).*"
                                      r"model.diffusion.block_size equal to sampler.block_length "
                                      r"\(5\).*`--set sampler.cache=none`"):
    generate.decode(model, params, prompt, lengths, cfg)
  for cache in ("none", "prefix", "dual"):
    _, counts, _ = generate.decode(model, params, prompt, lengths,
                                   dataclasses.replace(cfg, cache=cache))
    assert counts.shape == (1,)


def test_a_negative_unmask_slots_is_a_clear_error():
  with pytest.raises(UserError, match="sampler.kind=unmask: slots must be >= 1, or 0 for all prompts"):
    config_lib.validate(config_lib.Experiment(sampler=SamplerConfig(kind="unmask",
                                                                    slots=-1)))

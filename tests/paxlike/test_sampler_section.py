"""The experiment's sampler section: a tagged union over `samplers.registry`, from Python, the CLI
overrides and stored configs; and generate's cache room computed from each kind's spec."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from models.build import build_model
from models.config import ModelConfig
from paxlike import config as config_lib
from paxlike import generate, sampler_section
from paxlike.config import SamplerConfig
from paxlike.errors import UserError
from samplers import registry


@pytest.mark.parametrize("kind", registry.KINDS)
def test_every_kind_is_a_section_with_its_own_settings(kind):
  cfg = SamplerConfig(kind=kind, temperature=0.0)
  spec = registry.get(kind)
  assert type(cfg) is sampler_section.class_of(kind) and isinstance(cfg, SamplerConfig)
  own = [f.name for f in dataclasses.fields(spec.options)]
  shared = [f.name for f in dataclasses.fields(SamplerConfig)]
  assert sampler_section.settings_of(kind) == shared + own
  assert len(dataclasses.fields(cfg)) <= 25
  assert cfg.options() == spec.options()  # defaults come from the sampler's options
  config_lib.validate(config_lib.Experiment(sampler=cfg))
  stored = json.loads(config_lib.to_json(config_lib.Experiment(sampler=cfg)))
  assert config_lib.from_dict(config_lib.Experiment, stored).sampler == cfg


def test_changing_the_kind_keeps_shared_and_common_settings_only():
  spec = SamplerConfig(kind="speculative", num_draft_tokens=6, temperature=0.0, prompt="x")
  spectr = dataclasses.replace(spec, kind="spectr")
  assert (spectr.num_draft_tokens, spectr.temperature, spectr.prompt) == (6, 0.0, "x")
  ar = dataclasses.replace(spectr, kind="ar")
  assert not hasattr(ar, "num_draft_tokens") and ar.prompt == "x"
  assert dataclasses.replace(ar, kind="speculative").num_draft_tokens == 4  # its default again
  with pytest.raises(TypeError):
    SamplerConfig(kind="ar", num_draft_tokens=3)  # a setting ar does not have


def test_overrides_set_the_kind_first_and_name_the_valid_settings():
  exp = config_lib.Experiment()
  tree = config_lib.apply_overrides(exp, ["sampler.branching=2,1", "sampler.kind=tree"])
  assert tree.sampler.kind == "tree" and tree.sampler.branching == (2, 1)
  with pytest.raises(UserError, match="'sampler.branching' for sampler.kind=ar: it is a setting "
                                      "of sampler.kind=tree / medusa; add --set sampler.kind=tree"):
    config_lib.apply_overrides(exp, ["sampler.branching=2,1"])
  with pytest.raises(UserError, match="sampler.tree_branching is now sampler.branching"):
    config_lib.apply_overrides(exp, ["sampler.kind=tree", "sampler.tree_branching=2"])
  with pytest.raises(UserError, match="sampler.kind=mdlm's own settings: steps, schedule"):
    config_lib.apply_overrides(exp, ["sampler.kind=mdlm", "sampler.nonsense=1"])
  with pytest.raises(UserError, match="sampler.kind='beam' is unknown; valid: ar, speculative"):
    config_lib.apply_overrides(exp, ["sampler.kind=beam"])
  with pytest.raises(UserError, match="sampler.kind=tree: tree spec malformed"):
    config_lib.validate(config_lib.apply_overrides(exp, ["sampler.kind=tree",
                                                         "sampler.branching=0"]))


def test_a_bad_seed_is_a_clear_error():
  for override, message in (("train.seed=-1", r"train.seed must be in \[0, 2\*\*32\)"),
                            ("sampler.seed=-1", "sampler.seed must be >= 0")):
    with pytest.raises(UserError, match=message):
      config_lib.validate(config_lib.apply_overrides(config_lib.Experiment(), [override]))


def test_a_section_stored_by_the_flat_schema_still_loads():
  legacy = {"kind": "tree", "max_new_tokens": 40, "temperature": 0.0, "top_k": 0, "top_p": 0.95,
            "seed": 1, "prompt": "p", "draft_workdir": "", "draft_experiment": "",
            "num_draft_tokens": 4, "num_drafts": 2, "tree_branching": [3, 1],
            "tree_children": "top", "tree_node_budget": 8, "jacobi_block": 8,
            "unmask_rule": "threshold", "unmask_threshold": 0.9, "block_cached": True,
            "diffusion_experiment": "", "selection": "none", "num_samples": 1}
  got = config_lib.from_dict(SamplerConfig, legacy)
  assert got == SamplerConfig(kind="tree", max_new_tokens=40, temperature=0.0, seed=1,
                              prompt="p", branching=(3, 1), children="top")
  for cached, cache in ((True, "exact"), (False, "none")):  # block's bool, flat and per kind
    for stored in (legacy | {"kind": "block", "block_cached": cached},
                   {"kind": "block", "block_length": 4, "cached": cached}):
      got = config_lib.from_dict(SamplerConfig, stored)
      assert got.cache == cache and got.kind == "block"


def _tiny_causal():
  model = build_model(ModelConfig(num_layers=1, d_model=32, num_heads=2, num_kv_heads=2,
                                  mlp_dim=64, max_len=32))
  return model, model.init(jax.random.key(0))


@pytest.mark.parametrize("kind, settings, room", [
    ("tree", dict(branching=(2, 2, 1)), 32 - 4 - (2 + 4 + 4 - 1)),  # every node needs a slot
    ("dynamic_tree", dict(node_budget=6, max_depth=3), 32 - 4 - 5),
    ("speculative", dict(num_draft_tokens=3), 32 - 4 - 3),
])
def test_long_drafted_decodes_are_shortened_to_the_cache_room(kind, settings, room):
  model, params = _tiny_causal()
  prompt, lengths = np.full([1, 4], 7, np.int32), np.array([4], np.int32)
  cfg = SamplerConfig(kind=kind, max_new_tokens=100, temperature=0.0, **settings)
  tokens, counts, _ = generate.decode(model, params, prompt, lengths, cfg, model, params)
  assert tokens.shape[1] == room and counts[0] <= room


@dataclasses.dataclass(frozen=True)
class _ShortOptions:
  """A new kind's settings: AR that stops after `cap` tokens."""
  cap: int = 3


def test_a_new_kind_needs_only_its_spec_in_the_registry(monkeypatch):
  from samplers import ar
  from samplers.spec import SamplerSpec
  spec = SamplerSpec("short_ar", _ShortOptions, ar.sample, lambda o, decode: ar.ARConfig(
      **(decode.common() | {"max_new_tokens": min(o.cap, decode.max_new_tokens)})))
  monkeypatch.setitem(registry.SPECS, "short_ar", spec)
  exp = config_lib.validate(config_lib.apply_overrides(
      config_lib.Experiment(), ["sampler.kind=short_ar", "sampler.cap=2", "sampler.temperature=0"]))
  assert exp.sampler.cap == 2
  model, params = _tiny_causal()
  prompt, lengths = np.full([1, 4], 7, np.int32), np.array([4], np.int32)
  tokens, _, stats = generate.decode(model, params, prompt, lengths, exp.sampler)
  assert tokens.shape == (1, 2) and stats["sampler"] == "short_ar"

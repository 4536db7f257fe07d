"""Config schema, overrides, diffs and the registry."""

import dataclasses

import jax
import pytest

from models.causal_lm import CausalLM
from models.config import DiffusionConfig, FinalityConfig, ModelConfig, ParScaleConfig
from paxlike import config as config_lib
from paxlike import registry
from paxlike.errors import UserError

registry.load_modules()


@pytest.mark.parametrize("name", registry.names())
def test_every_registered_experiment_builds(name):
  exp = config_lib.validate(registry.get(name))
  assert exp.name == name
  model = CausalLM(exp.model)
  shapes = jax.eval_shape(model.init, jax.random.key(0))
  assert jax.tree.leaves(shapes)
  assert config_lib.from_dict(config_lib.Experiment, config_lib.to_dict(exp)) == exp


def test_public_field_names_exist():
  keys = config_lib.flatten(registry.get("tiny"))
  for key in ("train.steps", "train.seed", "checkpoint.every_steps", "data.path", "data.seq_len",
              "model.num_layers", "model.d_model", "run.allow_config_change", "mesh.tensor"):
    assert key in keys


def test_tiny_shape_is_shardable_every_way_on_8_devices():
  exp = registry.get("tiny")
  assert exp.train.batch_size % 8 == 0
  assert exp.model.num_heads % 4 == 0 and exp.model.num_kv_heads % 4 == 0
  assert exp.data.seq_len % 16 == 0


def test_overrides_parse_to_field_types():
  exp = config_lib.apply_overrides(registry.get("tiny"), [
      "train.steps=7", "optimizer.learning_rate=1e-4", "model.tie_embeddings=false",
      "data.path=/x/*.txt", "model.dtype=bfloat16"])
  assert exp.train.steps == 7 and isinstance(exp.train.steps, int)
  assert exp.optimizer.learning_rate == 1e-4
  assert exp.model.tie_embeddings is False
  assert exp.data.path == "/x/*.txt"
  assert exp.model.dtype == "bfloat16"


def test_unknown_key_names_nearest_valid_keys():
  with pytest.raises(UserError, match=r"unknown config key 'model.dmodel'.*model.d_model"):
    config_lib.apply_overrides(registry.get("tiny"), ["model.dmodel=3"])


def test_wrong_type_names_field_and_expected_type():
  with pytest.raises(UserError, match=r"model.num_layers='two'.*expected int"):
    config_lib.apply_overrides(registry.get("tiny"), ["model.num_layers=two"])
  with pytest.raises(UserError, match=r"run.allow_config_change.*expected bool"):
    config_lib.apply_overrides(registry.get("tiny"), ["run.allow_config_change=perhaps"])


def test_section_cannot_be_set_as_a_whole():
  with pytest.raises(UserError, match="is a section"):
    config_lib.apply_overrides(registry.get("tiny"), ["model=3"])


def test_validate_names_inconsistent_fields():
  exp = registry.get("tiny")
  bad = dataclasses.replace(exp, model=dataclasses.replace(exp.model, num_kv_heads=3))
  with pytest.raises(UserError, match="num_kv_heads=3 must divide"):
    config_lib.validate(bad)
  with pytest.raises(UserError, match="seq_len=999 exceeds model.max_len"):
    config_lib.validate(config_lib.apply_overrides(exp, ["data.seq_len=999"]))


def test_diff_restricted_to_training_identity():
  a = registry.get("tiny")
  b = config_lib.apply_overrides(a, ["model.d_model=32", "sampler.temperature=0", "train.steps=99"])
  lines = config_lib.diff(a, b, config_lib.TRAINING_IDENTITY)
  assert lines == ["  model.d_model: 64 -> 32"]


def test_unknown_experiment_lists_registered():
  with pytest.raises(UserError, match="registered experiments: .*demo, .*tiny"):
    registry.get("nope")


def test_model_family_sections_are_set_by_dotted_keys():
  exp = config_lib.apply_overrides(registry.get("tiny"), [
      "model.parscale.streams=4", "model.parscale.prefix_len=2", "model.diffusion.block_size=16",
      "model.finality.steps=3"])
  assert (exp.model.parscale.streams, exp.model.parscale.prefix_len) == (4, 2)
  assert exp.model.diffusion.block_size == 16 and exp.model.finality.steps == 3
  assert exp.model.diffusion.mask_id == 259  # the rest of the section keeps its defaults
  with pytest.raises(UserError, match=r"'model.parscale' is a section.*model.parscale.streams"):
    config_lib.apply_overrides(exp, ["model.parscale=4"])
  with pytest.raises(UserError, match=r"unknown config key 'model.parscale_streams'.*"
                                      r"model.parscale.streams"):
    config_lib.apply_overrides(exp, ["model.parscale_streams=4"])  # the old flat name
  with pytest.raises(UserError, match=r"unknown config key 'model.diffusion.blocksize'.*"
                                      r"model.diffusion.block_size"):
    config_lib.apply_overrides(exp, ["model.diffusion.blocksize=4"])


# The model section as configs stored before the family sections wrote it (flat fields).
LEGACY_MODEL = {
    "kind": "mdlm", "vocab_size": 260, "num_layers": 2, "d_model": 64, "num_heads": 4,
    "num_kv_heads": 4, "head_dim": 0, "mlp_dim": 128, "max_len": 256, "rope_theta": 10000.0,
    "rope_scaling": "none", "rope_factor": 1.0, "rope_low_freq_factor": 1.0,
    "rope_high_freq_factor": 4.0, "rope_original_max_len": 8192, "norm_eps": 1e-05,
    "tie_embeddings": True, "dtype": "float32", "init_std": 0.02, "attention": "dense",
    "parscale_streams": 1, "parscale_prefix_len": 0, "parscale_smoothing": 0.05, "init_from": "",
    "mask_id": 258, "block_size": 16, "diffusion_schedule": "cosine", "diffusion_min_t": 0.9,
    "diffusion_min_t_rows": 0.5, "response_after": "=", "finality_dim": 32, "finality_steps": 4,
    "acceptance_head": False}


def test_stored_flat_model_config_loads_into_the_sections():
  expected = ModelConfig(
      kind="mdlm", parscale=ParScaleConfig(smoothing=0.05),
      diffusion=DiffusionConfig(mask_id=258, block_size=16, schedule="cosine", min_t=0.9,
                                min_t_rows=0.5, response_after="="),
      finality=FinalityConfig(dim=32, steps=4))
  assert config_lib.from_dict(ModelConfig, LEGACY_MODEL) == expected
  stored = config_lib.to_dict(registry.get("tiny"))
  exp = config_lib.from_dict(config_lib.Experiment, {**stored, "model": LEGACY_MODEL})
  assert exp.model == expected and exp.train == registry.get("tiny").train
  partial = {"kind": "llama", "parscale_streams": 2, "parscale_prefix_len": 8}  # old, sparse
  assert config_lib.from_dict(ModelConfig, partial).parscale == ParScaleConfig(2, 8)
  assert config_lib.from_dict(ModelConfig, {"acceptance_head": True}).draft_heads.acceptance
  new = config_lib.to_dict(expected)
  assert ModelConfig.upgrade_legacy(new) is new  # current layout: untouched
  with pytest.raises(ValueError, match="both mask_id=258 .* and diffusion.mask_id=7"):
    ModelConfig.upgrade_legacy({**LEGACY_MODEL, "diffusion": {"mask_id": 7}})
  with pytest.raises(UserError, match="unknown config key 'model.mask_idx'"):
    config_lib.from_dict(config_lib.Experiment, {"model": {"mask_idx": 1}})


@pytest.mark.parametrize("override, message", [
    ("optimizer.learning_rate=0", r"optimizer.learning_rate must be > 0, got 0.0"),
    ("optimizer.b2=1", r"optimizer.b2 must be in \[0, 1\), got 1.0"),
    ("schedule.warmup_steps=-5", "schedule.warmup_steps must be >= 0, got -5"),
    ("mesh.tensor=0", "mesh.tensor must be >= 1, or -1 for the remaining devices, got 0"),
    ("train.seed=4294967296", r"train.seed must be in \[0, 2\*\*32\), got 4294967296"),
    ("train.distill_weight=1.5", r"train.distill_weight must be in \[0, 1\]"),
    ("eval.batches=0", "eval.batches must be >= 1, got 0"),
    ("data.eval_fraction=1", r"data.eval_fraction must be in \(0, 1\)"),
])
def test_every_numeric_field_out_of_range_is_named(override, message):
  with pytest.raises(UserError, match=message):
    config_lib.validate(config_lib.apply_overrides(registry.get("tiny"), [override]))

"""Config schema, overrides, diffs and the registry."""

import dataclasses

import jax
import pytest

from models.causal_lm import CausalLM
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

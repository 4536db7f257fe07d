"""The run handle (`paxlike.run.Run`): config.json in and out, the refusal of a changed training
config, restoring a trained workdir (on its mesh or another), and clear errors for what is missing."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from paxlike import config as config_lib
from paxlike import interchange, registry
from paxlike.errors import UserError
from paxlike.optim import param_path
from paxlike.run import Run
from paxlike.train import Trainer
from tests.models.random_params import random_params

registry.load_modules()


def _exp(*overrides):
  return config_lib.validate(config_lib.apply_overrides(
      registry.get("tiny"), ["train.steps=2", "checkpoint.every_steps=2", "eval.batches=1",
                             *overrides]))


def _flat(params):
  return {param_path(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """(workdir, final params) of `tiny` trained for 2 steps, its config written through Run."""
  workdir = tmp_path_factory.mktemp("trained")
  exp = _exp()
  Run(workdir).write_config(exp)
  result = Trainer(exp, workdir, log=lambda _: None).run()
  return workdir, _flat(result.params)


# ------------------------------------------------------------------------------------ config.json


def test_config_round_trip(tmp_path):
  run = Run(tmp_path)
  assert run.stored_config() is None
  exp = _exp("model.d_model=32", "train.seed=7")
  run.write_config(exp)
  assert run.config_path == tmp_path / "config.json"
  assert run.config_path.read_text() == config_lib.to_json(exp) + "\n"
  assert Run(tmp_path).stored_config() == exp
  assert Run(tmp_path).exp == exp
  given = _exp("sampler.temperature=0")
  assert Run(tmp_path, given).exp == given  # an experiment passed in wins over config.json


def test_invalid_config_is_named(tmp_path):
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(UserError, match="config.json is not a valid paxlike config"):
    Run(tmp_path).stored_config()
  (tmp_path / "config.json").write_text(json.dumps({"model": {"d_model": 64, "colour": "red"}}))
  with pytest.raises(UserError, match="unknown config key 'model.colour'"):
    Run(tmp_path).exp


def test_a_changed_training_config_is_refused_with_its_diff(tmp_path):
  run = Run(tmp_path)
  run.check_unchanged(_exp("model.d_model=32"))  # nothing stored yet: anything goes
  run.write_config(_exp())
  run.check_unchanged(_exp("train.steps=50", "sampler.temperature=0"))  # not the trained model
  changed = _exp("model.d_model=32", "optimizer.learning_rate=0.01", "train.steps=50")
  assert run.config_changes(changed) == ["  model.d_model: 64 -> 32",
                                         "  optimizer.learning_rate: 0.003 -> 0.01"]
  with pytest.raises(UserError) as error:
    run.check_unchanged(changed)
  assert str(error.value) == (
      f"workdir {str(tmp_path)!r} holds a run with a different configuration:\n"
      "  model.d_model: 64 -> 32\n  optimizer.learning_rate: 0.003 -> 0.01\n"
      "use a new --workdir, or pass --set run.allow_config_change=true to continue anyway")
  with pytest.raises(UserError) as error:
    run.check_unchanged(changed, companion="companion draft")
  assert str(error.value) == (
      f"the companion draft in {str(tmp_path)!r} was trained differently:\n"
      "  model.d_model: 64 -> 32\n  optimizer.learning_rate: 0.003 -> 0.01\n"
      "use a new --workdir")
  run.check_unchanged(changed, allow_change=True)


# ------------------------------------------------------------------------------------ restore


def test_restore_gives_the_trained_model_and_params(trained):
  workdir, final = trained
  model, params, step = Run(workdir).restore()
  assert step == 2 and model.config == _exp().model
  restored = _flat(params)
  assert restored.keys() == final.keys()
  for name, value in final.items():
    np.testing.assert_array_equal(restored[name], value, err_msg=name)


def test_restore_onto_another_mesh_uses_the_trainer_shardings(trained):
  workdir, final = trained
  run = Run(workdir)
  mesh = config_lib.MeshConfig(data=2, fsdp=4)
  params = run.restore(mesh).params
  expected = run.layout(mesh).state_shardings.params
  leaves = jax.tree_util.tree_leaves_with_path(params)
  for (path, leaf), sharding in zip(leaves, jax.tree.leaves(expected)):
    assert leaf.sharding == sharding, param_path(path)
    np.testing.assert_array_equal(np.asarray(leaf), final[param_path(path)])
  assert any(not leaf.sharding.is_fully_replicated for _, leaf in leaves)  # fsdp shards some


def test_restore_without_a_config_or_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(UserError, match=r"has no trained run \(no config.json\)"):
    Run(tmp_path).restore()
  Run(tmp_path).write_config(_exp())
  with pytest.raises(UserError) as error:
    Run(tmp_path).restore()
  assert str(error.value) == (f"workdir {str(tmp_path)!r} has no checkpoint; train it first "
                              "with --mode=train")
  assert not (tmp_path / "checkpoints").exists()  # reading creates nothing


def test_restore_without_a_checkpoint_imports_model_init_from(tmp_path):
  """A run of a Hugging Face model that has not trained yet restores the imported weights."""
  exp = _exp()
  source = tmp_path / "hf"
  weights = random_params(Run(tmp_path, exp).layout().model, seed=3)
  interchange.save_hf(source, exp.model, weights)
  imported = dataclasses.replace(exp, model=interchange.resolve_model(
      dataclasses.replace(exp.model, init_from=str(source))))
  logs = []
  _, params, step = Run(tmp_path / "run", imported, log=logs.append).restore()
  assert step == 0 and logs == [f"initialised the model from {source}"]
  restored, expected = _flat(params), _flat(weights)
  assert restored.keys() == expected.keys()
  for name, value in expected.items():
    np.testing.assert_array_equal(restored[name], value, err_msg=name)

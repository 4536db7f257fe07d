"""Starting from another run's parameters (train.init_from) and freezing (train.trainable)."""

import jax
import numpy as np
import pytest

from paxlike import config as config_lib
from paxlike import registry
from paxlike.errors import UserError
from paxlike.optim import param_path
from paxlike.run import Run
from paxlike.train import Trainer

registry.load_modules()


def _exp(*overrides):
  return config_lib.validate(config_lib.apply_overrides(
      registry.get("tiny"), ["train.steps=3", "checkpoint.every_steps=3", *overrides]))


def _flat(params):
  return {param_path(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def _trained(exp, workdir):
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.json").write_text(config_lib.to_json(exp))
  trainer = Trainer(exp, workdir, log=lambda _: None)
  trainer.run()
  return _flat(Run(workdir).restore().params)


def test_init_from_copies_and_trainable_freezes(tmp_path):
  base = _trained(_exp(), tmp_path / "base")
  tuned = _trained(_exp(f"train.init_from={tmp_path / 'base'}", "train.trainable=^blocks_1/",
                        "train.seed=7"), tmp_path / "tuned")
  assert tuned.keys() == base.keys()
  for name, value in tuned.items():
    if name.startswith("blocks_1/"):
      assert not np.array_equal(value, base[name]), f"{name} should have been trained"
    else:
      np.testing.assert_array_equal(value, base[name], err_msg=f"{name} should be frozen")


def test_init_from_refuses_other_shapes(tmp_path):
  _trained(_exp(), tmp_path / "base")
  wider = Trainer(_exp("model.d_model=32", "model.mlp_dim=64",
                       f"train.init_from={tmp_path / 'base'}"), tmp_path / "wider",
                  log=lambda _: None)
  with pytest.raises(UserError, match="does not fit this model: blocks_0"):
    wider.init_state()


def test_trainable_must_be_a_regex():
  with pytest.raises(UserError, match="train.trainable"):
    _exp("train.trainable=blocks_(")

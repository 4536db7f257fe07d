"""Distillation from a trained teacher (train.teacher_workdir), as used for speculative drafts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paxlike import config as config_lib
from paxlike import registry
from paxlike.errors import UserError
from paxlike.metrics import read_metrics
from models.losses import distillation_kl
from paxlike.train import Trainer

registry.load_modules()


def _exp(*overrides):
  return config_lib.apply_overrides(registry.get("tiny"), list(overrides))


def _train(exp, workdir):
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.json").write_text(config_lib.to_json(exp))
  return Trainer(exp, workdir, log=lambda _: None).run()


def test_kl_matches_its_definition():
  s, t = jax.random.normal(jax.random.key(0), (2, 2, 3, 5))
  p = jax.nn.softmax(t)
  expected = jnp.sum(p * (jnp.log(p) - jax.nn.log_softmax(s)), -1)
  np.testing.assert_allclose(distillation_kl(s, t), expected, rtol=1e-5)
  assert float(distillation_kl(t, t).max()) < 1e-6


def test_student_learns_the_teacher(tmp_path):
  _train(_exp("train.steps=15", "checkpoint.every_steps=15"), tmp_path / "teacher")
  student = _exp("train.steps=15", "checkpoint.every_steps=15", "model.num_layers=1",
                 "model.d_model=32", f"train.teacher_workdir={tmp_path / 'teacher'}")
  _train(student, tmp_path / "student")
  records = [r for r in read_metrics(tmp_path / "student" / "metrics.jsonl") if "kl" in r]
  assert records[0]["kl"] > 1.5 * records[-1]["kl"]
  assert all(r["loss"] == pytest.approx(r["kl"]) for r in records)  # distill_weight = 1


def test_teacher_problems_are_named(tmp_path):
  with pytest.raises(UserError, match="has no trained run"):
    Trainer(_exp(f"train.teacher_workdir={tmp_path}/none"), tmp_path / "s", log=lambda _: None)
  teacher = _exp("train.steps=1", "model.vocab_size=300")
  (tmp_path / "t").mkdir()
  (tmp_path / "t" / "config.json").write_text(config_lib.to_json(teacher))
  with pytest.raises(UserError, match="teacher's model.vocab_size=300 differs from this model's 260"):
    Trainer(_exp(f"train.teacher_workdir={tmp_path / 't'}"), tmp_path / "s", log=lambda _: None)

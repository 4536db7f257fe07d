"""Distillation from a trained teacher (train.teacher_workdir), as used for speculative drafts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paxlike import config as config_lib
from paxlike import registry, teacher_text
from paxlike.errors import UserError
from paxlike.metrics import read_metrics
from models.losses import distillation_kl
from paxlike.data import load_corpus
from paxlike.interchange import text_codec
from paxlike.run import Run
from paxlike.train import Trainer
from samplers import ar
from samplers.core.logits import SamplingParams

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


@pytest.mark.slow
def test_teacher_text_continues_training_windows_and_trains_a_draft(tmp_path, monkeypatch):
  result = _train(_exp("train.steps=2", "checkpoint.every_steps=2"), tmp_path / "teacher")
  assert result.step == 2
  teacher = Run(tmp_path / "teacher", log=lambda _: None)
  model, params, _ = teacher.restore(config_lib.MeshConfig())
  corpus = load_corpus(teacher.exp.data, text_codec(teacher.exp.model)).train
  rows = teacher_text.continuations(model, params, corpus, prompts=3, prompt_len=8,
                                    new_tokens=5, temperature=0.0, seed=0, batch=2)
  assert len(rows) == 3 and all(r.shape == (13,) for r in rows)
  windows = {tuple(corpus[s:s + 8]) for s in range(len(corpus) - 8)}
  for row in rows:  # a training window, then the teacher's greedy continuation of it alone
    assert tuple(row[:8]) in windows
    alone = ar.sample(model, params, jnp.asarray(row[None, :8]), jnp.array([8]),
                      jax.random.key(1), ar.ARConfig(max_new_tokens=5,
                                                     sampling=SamplingParams(temperature=0.0)))
    np.testing.assert_array_equal(np.asarray(alone.tokens)[0], row[8:])
  out = teacher_text.write(tmp_path / "teacher", tmp_path / "text.txt", prompts=4, prompt_len=16,
                           new_tokens=24, temperatures=(0.0, 1.0), batch=4)
  assert out.read_text().count(teacher_text.SEPARATOR) >= 7
  draft = _exp("train.steps=2", "checkpoint.every_steps=2", "model.num_layers=1",
               "data.seq_len=32", "data.eval_fraction=0.25", f"data.path={out}",
               f"train.teacher_workdir={tmp_path / 'teacher'}")
  assert _train(draft, tmp_path / "draft").step == 2
  with pytest.raises(UserError, match="exceeds the model's max_len"):
    teacher_text.write(tmp_path / "teacher", tmp_path / "x.txt", prompt_len=8, new_tokens=10**4)
  # NUL bytes (any byte an untrained model emits) are dropped: the data loader would take the
  # file for binary
  monkeypatch.setattr(teacher_text, "continuations",
                      lambda *_, **__: [np.frombuffer(b"h\x00i", np.uint8).astype(np.int32)])
  nul = teacher_text.write(tmp_path / "teacher", tmp_path / "nul.txt", prompts=1, prompt_len=8,
                           new_tokens=3, temperatures=(0.0,))
  assert nul.read_text() == "hi\n"

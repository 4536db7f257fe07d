"""The SpecDec++ acceptance head: its label (1 - TV), gradients that reach only the head, training
with the trainer on a frozen draft against a target, and decoding with it from Python and the
CLI."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.acceptance_head import AcceptanceDraftLM, acceptance_label
from models.build import build_model
from models.config import DraftHeadsConfig, ModelConfig
from paxlike import config as config_lib
from paxlike import generate, registry
from paxlike.errors import UserError
from paxlike.metrics import read_metrics
from paxlike.optim import param_path
from paxlike.run import Run
from paxlike.train import Trainer
from tests.models.random_params import random_params
from tests.paxlike import cli

registry.load_modules()


def test_the_label_is_one_minus_the_total_variation_distance():
  """p = (.5, .3, .2), q = (.2, .2, .6): sum min = .6 = 1 - TV, TV = (.3 + .1 + .4) / 2."""
  p, q = np.log([0.5, 0.3, 0.2]), np.log([0.2, 0.2, 0.6])
  label = acceptance_label(jnp.asarray([[p, q]]), jnp.asarray([[q, q]]))
  np.testing.assert_allclose(label, [[0.6, 1.0]], rtol=1e-6)


def test_build_model_gives_the_head_and_its_gradient_reaches_only_the_head():
  config = ModelConfig(num_layers=1, d_model=16, num_heads=2, num_kv_heads=2, mlp_dim=32,
                       vocab_size=32, max_len=16, draft_heads=DraftHeadsConfig(acceptance=True))
  model = build_model(config)
  assert isinstance(model, AcceptanceDraftLM)
  params = random_params(model)
  batch = jax.random.randint(jax.random.key(0), (2, 9), 0, 32)
  teacher = jax.random.normal(jax.random.key(1), (2, 8, 32))
  grads, parts = jax.jit(jax.grad(lambda p: model.loss(p, batch, None, teacher),
                                  has_aux=True))(params)
  norms = {name: float(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(tree)))
           for name, tree in grads.items()}
  assert norms.pop("acceptance_head") > 0 and not any(norms.values()), norms
  assert 0 < float(parts["acceptance"]) < 1 and float(parts["bce_excess"]) >= 0
  with pytest.raises(ValueError, match="trains the acceptance head against a target"):
    model.loss(params, batch, None)


def test_bad_adaptive_settings_are_named():
  tiny = registry.get("tiny")
  for override, message in (("sampler.stop_threshold=2", r"stop_threshold must be in \[0, 1\]"),
                            ("sampler.confidence_threshold=-1", "confidence_threshold must be in"),
                            ("sampler.rule=length", "adaptive rule 'length' is unknown; "
                                                    "valid rules: confidence, head")):
    with pytest.raises(UserError, match=message):
      config_lib.validate(config_lib.apply_overrides(tiny, [override, "sampler.kind=adaptive"]))
  with pytest.raises(UserError, match="set train.teacher_workdir"):
    config_lib.validate(config_lib.apply_overrides(tiny, ["model.draft_heads.acceptance=true"]))
  with pytest.raises(UserError, match="set train.trainable=acceptance_head"):
    config_lib.validate(config_lib.apply_overrides(tiny, ["model.draft_heads.acceptance=true",
                                                          "train.teacher_workdir=runs/t"]))


def _train(workdir, *overrides):
  exp = config_lib.validate(config_lib.apply_overrides(registry.get("tiny"), [
      "model.num_layers=1", "eval.batches=1", *overrides]))
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.json").write_text(config_lib.to_json(exp))
  trainer = Trainer(exp, workdir, log=lambda _: None)
  trainer.run()
  return trainer, Run(workdir).restore().params


def assert_frozen(trained_params, original_params) -> None:
  """Every parameter of `original_params` is in `trained_params`, bit for bit (frozen weights)."""
  flat = lambda params: {param_path(p): np.asarray(v)
                         for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  trained, original = flat(trained_params), flat(original_params)
  for name, value in original.items():
    np.testing.assert_array_equal(trained[name], value, err_msg=f"{name} should be frozen")


@pytest.mark.slow
def test_the_trainer_fits_the_head_on_a_frozen_draft_and_samplers_use_it(tmp_path):
  """teacher (2 layers) -> draft (1 layer) -> head (draft frozen, 30 steps): the loss falls, the
  draft's weights are untouched; greedy adaptive decoding with the head equals greedy AR, from
  Python and from the CLI."""
  teacher, teacher_params = _train(tmp_path / "teacher", "model.num_layers=2", "train.steps=3",
                                   "checkpoint.every_steps=3")
  _, draft_params = _train(tmp_path / "draft", "train.steps=2",
                           "checkpoint.every_steps=2")
  head, head_params = _train(
      tmp_path / "head", "model.draft_heads.acceptance=true", "train.steps=30",
      "checkpoint.every_steps=30", "optimizer.learning_rate=1e-2",
      f"train.init_from={tmp_path / 'draft'}", f"train.teacher_workdir={tmp_path / 'teacher'}",
      "train.trainable=acceptance_head")
  records = [r for r in read_metrics(tmp_path / "head" / "metrics.jsonl") if "bce_excess" in r]
  assert records[-1]["loss"] < 0.8 * records[0]["loss"], (records[0], records[-1])
  assert records[-1]["bce_excess"] < 0.5 * records[0]["bce_excess"], (records[0], records[-1])
  assert_frozen(head_params, draft_params)

  prompt, lengths = generate.encode_prompts(["ROMEO:", "JULIET: O"], 128)
  base = dataclasses.replace(teacher.exp.sampler, max_new_tokens=24, temperature=0.0)
  ar_tokens, _, _ = generate.decode(teacher.model, teacher_params, prompt, lengths, base)
  adaptive = dataclasses.replace(base, kind="adaptive", rule="head", stop_threshold=0.5)
  tokens, _, stats = generate.decode(teacher.model, teacher_params, prompt, lengths, adaptive,
                                     head.model, head_params)
  np.testing.assert_array_equal(tokens, ar_tokens)
  assert stats["target_calls"] < stats["tokens"] and 1 <= stats["mean_draft_length"] <= 4
  with pytest.raises(UserError, match="adaptive rule 'head' needs a draft with an acceptance"):
    generate.decode(teacher.model, teacher_params, prompt, lengths, adaptive,
                    teacher.model, teacher_params)

  result = cli.run(f"--workdir={tmp_path / 'teacher'}", "--mode=sample", "--prompt=ROMEO:",
                   "--set", "sampler.kind=adaptive", "--set", "sampler.rule=head",
                   "--set", f"sampler.draft_workdir={tmp_path / 'head'}", "--set",
                   "sampler.temperature=0", "--set", "sampler.max_new_tokens=24")
  assert result.returncode == 0, result.stderr
  stats = cli.last_json(result.stdout)
  assert stats["sampler"] == "adaptive" and stats["draft_calls"] + stats["draft_calls_saved"] > 1

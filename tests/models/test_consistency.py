"""CLLM consistency training (`models.consistency`, `train.consistency_block`): the teacher's
Jacobi trajectory against brute-force greedy iteration with full forward passes, the objective
against its definition, and the trainer end to end (the trained model raises the number of
tokens a Jacobi call confirms and still decodes exactly)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from models import consistency
from models.causal_lm import CausalLM
from models.config import ModelConfig
from models.losses import next_token_nll
from paxlike import config as config_lib
from paxlike import generate, registry
from paxlike.errors import UserError
from paxlike.metrics import read_metrics
from paxlike.run import Run
from tests.models.random_params import random_params
from tests.paxlike.test_distill import _exp, _train

registry.load_modules()

MODEL = CausalLM(ModelConfig(num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, mlp_dim=64,
                             vocab_size=11, max_len=32, init_std=0.4))
BLOCK = 5


def _batch(seed: int, rows: int = 3, length: int = 13) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).integers(0, 11, (rows, length)), jnp.int32)


def _greedy(params, prefix: np.ndarray, steps: int) -> np.ndarray:
  """Greedy AR continuation by full forward passes (no cache)."""
  seq = np.asarray(prefix)
  for _ in range(steps):
    nxt = np.argmax(np.asarray(MODEL.logits(params, jnp.asarray(seq)))[:, -1], -1)
    seq = np.concatenate([seq, nxt[:, None]], axis=1)
  return seq[:, prefix.shape[1]:]


def _jacobi_step(params, prefix: np.ndarray, guesses: np.ndarray) -> np.ndarray:
  """One Jacobi iteration by a full forward pass: the greedy outputs for the block's n places."""
  logits = MODEL.logits(params, jnp.asarray(np.concatenate([prefix, guesses], axis=1)))
  return np.argmax(np.asarray(logits)[:, prefix.shape[1] - 1:], -1)


def check_trajectory(params, batch, states, fixed) -> None:
  """AssertionError unless `fixed` is the greedy continuation of the prefix and every state is
  the Jacobi iterate of the one before, from the last prefix token repeated (the sampler's first
  guesses)."""
  prefix = np.asarray(batch)[:, :batch.shape[1] - BLOCK]
  states, fixed = np.asarray(states), np.asarray(fixed)
  np.testing.assert_array_equal(fixed, _greedy(params, prefix, BLOCK))
  np.testing.assert_array_equal(states[0], np.repeat(prefix[:, -1:], BLOCK - 1, axis=1))
  for t in range(len(states)):
    outputs = _jacobi_step(params, prefix, states[t])
    after = states[t + 1] if t + 1 < len(states) else fixed[:, :-1]
    np.testing.assert_array_equal(outputs[:, :-1], after)
    assert np.all(consistency.leading_matches(jnp.asarray(states[t]), fixed[:, :-1]) >= t)


def test_the_trajectory_is_greedy_jacobi_iteration_to_the_greedy_continuation():
  params, batch = random_params(MODEL, seed=1), _batch(0)
  states, fixed = jax.jit(consistency.teacher_trajectory, static_argnums=(0, 3))(
      MODEL, params, batch, BLOCK)
  assert states.shape == (BLOCK, 3, BLOCK - 1) and fixed.shape == (3, BLOCK)
  assert len(np.unique(np.asarray(fixed))) > 2  # the weights make varied greedy tokens
  check_trajectory(params, batch, states, fixed)


def test_a_trajectory_that_refills_the_guesses_one_place_off_is_caught():
  params, batch = random_params(MODEL, seed=1), _batch(0)
  states, fixed = consistency.teacher_trajectory(MODEL, params, batch, BLOCK)
  prefix = np.asarray(batch)[:, :batch.shape[1] - BLOCK]
  broken = [np.asarray(states[0])]
  for _ in range(BLOCK - 1):  # the outputs shifted by one place, as a wrong refill would
    broken.append(_jacobi_step(params, prefix, broken[-1])[:, 1:])
  with pytest.raises(AssertionError):
    check_trajectory(params, batch, np.stack(broken), fixed)


def test_the_loss_is_the_consistency_cross_entropy_plus_the_weighted_ar_term():
  params, batch = random_params(MODEL, seed=2), _batch(3)
  trajectory = consistency.teacher_trajectory(MODEL, random_params(MODEL, seed=1), batch, BLOCK)
  key = jax.random.key(7)
  total, metrics = consistency.loss(MODEL, params, batch, trajectory, key, ar_weight=0.5)
  states, fixed = trajectory
  drawn = jax.random.randint(key, (3,), 0, BLOCK)
  prefix = batch[:, :-BLOCK]
  state = jnp.stack([states[d, r] for r, d in enumerate(np.asarray(drawn))])
  from_state = MODEL.logits(params, jnp.concatenate([prefix, state], 1))[:, -BLOCK:]
  converged = jnp.concatenate([prefix, fixed], 1)
  ar = next_token_nll(MODEL.logits(params, converged[:, :-1]), converged[:, 1:]).mean()
  expected = next_token_nll(from_state, fixed).mean()
  np.testing.assert_allclose(metrics["consistency_nll"], expected, rtol=1e-5)
  np.testing.assert_allclose(metrics["ar_nll"], ar, rtol=1e-5)
  np.testing.assert_allclose(total, expected + 0.5 * ar, rtol=1e-5)
  leading = consistency.leading_matches(jnp.argmax(from_state, -1), fixed)
  np.testing.assert_allclose(metrics["leading_correct"], leading.mean(), rtol=1e-6)


def test_leading_matches_counts_only_the_unbroken_prefix():
  got = consistency.leading_matches(jnp.array([[1, 2, 3], [1, 0, 3], [0, 2, 3]]),
                                    jnp.array([[1, 2, 3]] * 3))
  np.testing.assert_array_equal(got, [3, 1, 0])


def test_bad_consistency_settings_are_named(tmp_path):
  with pytest.raises(UserError, match="consistency_block must be 0 .off. or a Jacobi block >= 2"):
    config_lib.validate(_exp("train.consistency_block=1", "train.teacher_workdir=x"))
  with pytest.raises(UserError, match="set train.teacher_workdir"):
    config_lib.validate(_exp("train.consistency_block=4"))
  with pytest.raises(UserError, match="needs data.seq_len >= 9"):
    config_lib.validate(_exp("train.consistency_block=8", "data.seq_len=8",
                             "train.teacher_workdir=x"))
  with pytest.raises(UserError, match="plain causal model .* got kind 'llama', 1 streams"):
    config_lib.validate(_exp("train.consistency_block=4", "train.teacher_workdir=x",
                             "model.draft_heads.medusa=2", "train.trainable=medusa"))
  with pytest.raises(UserError, match="got kind 'mdlm'"):
    config_lib.validate(_exp("train.consistency_block=4", "train.teacher_workdir=x",
                             "model.kind=mdlm", "model.diffusion.mask_id=259"))
  with pytest.raises(UserError, match="consistency_ar_weight must be >= 0, got -1"):
    config_lib.validate(_exp("train.consistency_block=4", "train.teacher_workdir=x",
                             "train.consistency_ar_weight=-1"))
  with pytest.raises(UserError, match="consistency_ar_weight is used only with"):
    config_lib.validate(_exp("train.consistency_ar_weight=2"))
  with pytest.raises(UserError, match="distill_weight does not apply"):
    config_lib.validate(_exp("train.consistency_block=4", "train.teacher_workdir=x",
                             "train.distill_weight=0.5"))


def test_optimising_the_objective_maps_trajectory_states_to_the_fixed_point():
  """The student starts as the teacher: from the first state (the first token repeated) it
  predicts some leading tokens of the fixed point; 100 Adam steps on the objective of one batch of
  windows raise that by two or more."""
  teacher = random_params(MODEL, seed=1)
  batch = _batch(5, rows=8)
  trajectory = consistency.teacher_trajectory(MODEL, teacher, batch, BLOCK)
  tx = optax.adam(1e-2)

  @jax.jit
  def step(params, opt_state, key):
    (_, metrics), grads = jax.value_and_grad(consistency.loss, argnums=1, has_aux=True)(
        MODEL, params, batch, trajectory, key)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, metrics

  def leading(params):  # from the first state, where a Jacobi block starts
    inputs = jnp.concatenate([batch[:, :-BLOCK], trajectory[0][0]], axis=1)
    outputs = jnp.argmax(MODEL.logits(params, inputs)[:, -BLOCK:], axis=-1)
    return float(jnp.mean(consistency.leading_matches(outputs, trajectory[1])))

  params, opt_state = teacher, tx.init(teacher)
  before = leading(params)
  for i in range(100):
    params, opt_state, _ = step(params, opt_state, jax.random.key(100 + i))
  after = leading(params)
  assert after > before + 2, (before, after)


@pytest.mark.slow
def test_the_trainer_runs_consistency_training_and_the_model_decodes_exactly(tmp_path):
  target = tmp_path / "target"
  _train(_exp("train.steps=20", "checkpoint.every_steps=20", "data.seq_len=32"), target)
  _train(_exp("train.steps=6", "checkpoint.every_steps=6", "data.seq_len=32",
              "train.consistency_block=6", f"train.teacher_workdir={target}",
              f"train.init_from={target}"), tmp_path / "cllm")
  records = [r for r in read_metrics(tmp_path / "cllm" / "metrics.jsonl") if "loss" in r]
  assert len(records) == 6 and all(
      r["loss"] == pytest.approx(r["consistency_nll"] + r["ar_nll"], rel=1e-5) for r in records)
  run = Run(tmp_path / "cllm", log=lambda _: None)
  model, params, step = run.restore()
  assert step == 6
  prompt, lengths = generate.encode_prompts(["ROMEO:", "JULIET: O", "def f(x):"], 64)
  base = dataclasses.replace(run.exp.sampler, max_new_tokens=30, temperature=0.0)
  ar_tokens, _, _ = generate.decode(model, params, prompt, lengths, base)
  tokens, _, _ = generate.decode(model, params, prompt, lengths,
                                 dataclasses.replace(base, kind="jacobi", block_size=6))
  np.testing.assert_array_equal(tokens, ar_tokens)

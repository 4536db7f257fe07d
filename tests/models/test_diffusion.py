"""Masked diffusion LM: schedules and ELBO weights in closed form, SUBS, the exact ELBO of a tiny
random denoiser (enumerated) against the Monte-Carlo loss and against the true nll of the model's
one-at-a-time reverse process, block-causal masks and exact block caching, config errors, and the
trainer end to end (loss falls, resume is bit-exact, eval is finite)."""

import dataclasses
import itertools
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import diffusion, noise_schedule
from models.config import DiffusionConfig, FinalityConfig, ModelConfig
from models.diffusion import MaskedDiffusionLM, subs_log_probs
from models.learn2pd import Learn2PD
from tests.models.diffusion_training import train
from tests.models.random_params import random_params
from tests.paxlike import cli

VOCAB, MASK, LENGTH = 5, 4, 3  # tokens 0..3, mask 4
TINY = ModelConfig(kind="mdlm", vocab_size=VOCAB, diffusion=DiffusionConfig(mask_id=MASK),
                   num_layers=1, d_model=16, num_heads=2, num_kv_heads=2, mlp_dim=32, max_len=8,
                   init_std=0.5)


def _diffusion(config: ModelConfig, **changes) -> ModelConfig:
  """`config` with `changes` to its `diffusion` section."""
  return dataclasses.replace(config, diffusion=dataclasses.replace(config.diffusion, **changes))


@pytest.mark.parametrize("schedule", noise_schedule.SCHEDULES)
def test_schedule_weight_is_minus_alpha_prime_over_one_minus_alpha(schedule):
  t = jnp.linspace(0.01, 1.0, 100)
  alpha = noise_schedule.alpha(schedule, t)
  derivative = jax.vmap(jax.grad(lambda s: noise_schedule.alpha(schedule, s)))(t)
  np.testing.assert_allclose(noise_schedule.mask_probability(schedule, t), 1 - alpha, atol=1e-6)
  np.testing.assert_allclose(noise_schedule.loss_weight(schedule, t), -derivative / (1 - alpha),
                             rtol=2e-3)
  ends = noise_schedule.alpha(schedule, jnp.array([0.0, 1.0]))
  np.testing.assert_allclose(ends, [1.0, 0.0], atol=1e-7)
  tiny = noise_schedule.loss_weight(schedule, jnp.float32(1e-30))
  assert np.isfinite(tiny) and tiny > 0


def test_stratified_times_cover_the_unit_interval_evenly():
  t = np.sort(np.asarray(noise_schedule.stratified_times(jax.random.key(3), (4, 8))).ravel())
  assert 0 < t[0] and t[-1] <= 1
  np.testing.assert_allclose(np.diff(t), 1 / 32, atol=1e-6)
  floored = noise_schedule.stratified_times(jax.random.key(3), (32,), floor=0.5)
  assert float(floored.min()) > 0.5


def test_subs_excludes_the_mask_and_copies_unmasked_tokens():
  logits = jax.random.normal(jax.random.key(0), (2, 4, VOCAB))
  tokens = jnp.array([[MASK, 1, MASK, 3], [0, MASK, 2, MASK]])
  logp = np.asarray(subs_log_probs(logits, tokens, MASK))
  masked = np.asarray(tokens == MASK)
  np.testing.assert_allclose(np.exp(logp).sum(-1), 1.0, rtol=1e-6)
  assert np.all(np.isneginf(logp[..., MASK]))
  for b, i in zip(*np.nonzero(~masked)):
    expected = np.full(VOCAB, -np.inf)
    expected[tokens[b, i]] = 0.0
    np.testing.assert_array_equal(logp[b, i], expected)
  reference = jax.nn.log_softmax(logits.at[..., MASK].set(-jnp.inf))
  np.testing.assert_allclose(logp[masked], np.asarray(reference)[masked], rtol=1e-5)


def _states(length):
  """Every partially masked sequence over the tokens, [(VOCAB)^length, length]."""
  return np.array(list(itertools.product(range(VOCAB), repeat=length)), np.int32)


@pytest.fixture(scope="module")
def tiny_table():
  """The tiny random denoiser's SUBS log-probs at every state: {state tuple: [L, V]}."""
  model = MaskedDiffusionLM(TINY)
  params = random_params(model)
  states = _states(LENGTH)
  logp = np.asarray(jax.jit(model.denoise)(params, jnp.asarray(states)))
  return model, params, {tuple(s): p for s, p in zip(states.tolist(), logp)}


def _exact_elbo(table, x):
  """Sum over mask patterns of B(m, L - m + 1) times the masked tokens' cross-entropy."""
  total = 0.0
  for pattern in itertools.product([False, True], repeat=LENGTH):
    m = sum(pattern)
    if not m:
      continue
    z = tuple(MASK if p else v for p, v in zip(pattern, x))
    weight = math.factorial(m - 1) * math.factorial(LENGTH - m) / math.factorial(LENGTH)
    total += weight * -sum(table[z][i, x[i]] for i in range(LENGTH) if pattern[i])
  return total


def _reverse_process_probability(table, x):
  """p(x) of the continuous-time reverse process: a uniformly random order, one token per step
  drawn from the denoiser (the limit of the ancestral sampler)."""
  total = 0.0
  for order in itertools.permutations(range(LENGTH)):
    z, logp = [MASK] * LENGTH, 0.0
    for i in order:
      logp += table[tuple(z)][i, x[i]]
      z[i] = x[i]
    total += math.exp(logp) / math.factorial(LENGTH)
  return total


def test_exact_elbo_bounds_the_reverse_process_nll(tiny_table):
  _, _, table = tiny_table
  clean = [x for x in itertools.product(range(MASK), repeat=LENGTH)]
  probs = np.array([_reverse_process_probability(table, x) for x in clean])
  np.testing.assert_allclose(probs.sum(), 1.0, rtol=1e-5)  # a proper distribution
  elbo = np.array([_exact_elbo(table, x) for x in clean])
  gap = elbo + np.log(probs)
  assert np.all(gap >= -1e-5) and gap.max() > 1e-3  # a bound, and not trivially tight


@pytest.mark.parametrize("schedule", noise_schedule.SCHEDULES)
def test_monte_carlo_elbo_is_unbiased_for_either_schedule(tiny_table, schedule):
  model, params, table = tiny_table
  model = MaskedDiffusionLM(_diffusion(TINY, schedule=schedule))
  x = (2, 0, 3)
  rows = 8192
  batch = jnp.asarray(np.tile(np.array(x + (0,), np.int32), (rows, 1)))
  per_row, _ = jax.jit(model.elbo)(params, batch[:, :-1], jax.random.key(11))
  per_row = np.asarray(per_row, np.float64)
  stderr = per_row.std() / math.sqrt(rows)
  assert abs(per_row.mean() - _exact_elbo(table, x)) < 4 * stderr + 1e-3


BLOCK = dataclasses.replace(TINY, vocab_size=12, num_layers=2, num_kv_heads=1, init_std=0.3,
                            diffusion=DiffusionConfig(mask_id=11, block_size=2))


def test_block_causal_cache_and_training_pass_equal_denoise():
  model = MaskedDiffusionLM(BLOCK)
  params = random_params(model)
  rng = np.random.default_rng(0)
  clean = jnp.asarray(rng.integers(0, 11, (2, 8)), jnp.int32)
  # blocks 0-1 clean, block 2 partly masked, block 3 all masked
  state = clean.at[:, 6:].set(11).at[0, 4].set(11).at[1, 5].set(11)
  denoised = np.asarray(jax.jit(model.denoise)(params, state))

  future = state.at[:, 6:].set(jnp.array([[1, 2], [3, 4]]))  # later blocks never seen
  np.testing.assert_array_equal(np.asarray(jax.jit(model.denoise)(params, future))[:, :6],
                                denoised[:, :6])

  positions = jnp.broadcast_to(jnp.arange(8, dtype=jnp.int32), (2, 8))
  apply = jax.jit(model.apply)
  cache = model.init_cache(2, 8)
  prefix, cache = apply(params, state[:, :4], positions[:, :4], cache)  # block-causal
  block, _ = apply(params, state[:, 4:6], positions[:, 4:6], cache, jnp.ones((2, 2, 2), bool))
  np.testing.assert_allclose(np.asarray(prefix), denoised[:, :4], atol=1e-5)
  np.testing.assert_allclose(np.asarray(block), denoised[:, 4:6], atol=1e-5)

  # training sees block 2 exactly as decoding does: noisy block 2 over the clean blocks 0-1
  raw = jax.jit(model.clean_logits)(params, state, clean)
  np.testing.assert_allclose(np.asarray(subs_log_probs(raw, state, 11))[:, 4:6],
                             denoised[:, 4:6], atol=1e-5)


def test_bidirectional_denoiser_sees_the_whole_sequence():
  model = MaskedDiffusionLM(_diffusion(BLOCK, block_size=0))
  params = random_params(model)
  state = jnp.asarray([[1, 11, 3, 4, 5, 6, 11, 11]], jnp.int32)
  changed = state.at[0, 7].set(2)
  denoise = jax.jit(model.denoise)
  before, after = (np.asarray(denoise(params, s)) for s in (state, changed))
  assert np.abs(before[0, 1, :11] - after[0, 1, :11]).max() > 1e-4


@pytest.mark.parametrize("field,value,message", [
    ("diffusion.schedule", "linear", "model.diffusion.schedule='linear' is unknown"),
    ("diffusion.block_size", 3, "block_size=3 must be 0 .* divisor of model.max_len=8"),
    ("diffusion.block_size", -1, "block_size=-1 must be 0"),
    ("diffusion.mask_id", 5, "model.diffusion.mask_id=5 is not a token id"),
    ("attention", "ring", "needs model.attention='dense'"),
    ("diffusion.min_t", 1.0, "model.diffusion.min_t=1.0 must be in \\[0, 1\\)"),
    ("diffusion.min_t_rows", 1.5, "model.diffusion.min_t_rows=1.5 must be in \\[0, 1\\]"),
    ("diffusion.certainty_weight", -0.1, "certainty_weight=-0.1 must be >= 0"),
])
def test_bad_config_is_named(field, value, message):
  section, _, name = field.rpartition(".")
  config = (_diffusion(TINY, **{name: value}) if section
            else dataclasses.replace(TINY, **{name: value}))
  with pytest.raises(ValueError, match=message):
    MaskedDiffusionLM(config)


def test_min_t_trains_on_nearly_fully_masked_rows():
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, MASK, (256, 9)), jnp.int32)
  rates = {}
  for min_t, fraction in ((1e-3, 1.0), (0.9, 1.0), (0.9, 0.5)):
    model = MaskedDiffusionLM(_diffusion(TINY, min_t=min_t, min_t_rows=fraction))
    _, metrics = model.loss(random_params(model), tokens, jax.random.key(0))
    rates[min_t, fraction] = float(metrics["mask_rate"])
  assert abs(rates[1e-3, 1.0] - 0.5) < 0.05 and rates[0.9, 1.0] > 0.93  # t uniform on (min_t, 1]
  assert abs(rates[0.9, 0.5] - (0.5 + 0.95) / 2) < 0.05  # half the rows each way
  floors = diffusion.row_floors(8, 0.9, 0.25)
  np.testing.assert_allclose(floors[:, 0], [1e-3, 1e-3, 1e-3, 0.9] * 2)  # spread evenly


def test_certainty_is_the_mean_entropy_where_a_masked_prediction_is_right():
  """Against numpy: positions 0 and 2 are masked and predicted right, 1 masked and wrong, 3
  unmasked and right; only 0 and 2 count (an entropy over every masked position is caught)."""
  logits = jnp.asarray([[[2.0, 0.0, 0.0, 0.0, -jnp.inf], [0.0, 1.0, 0.0, 0.0, -jnp.inf],
                         [0.0, 0.0, 0.5, 0.1, -jnp.inf], [3.0, 0.0, 0.0, 0.0, -jnp.inf]]])
  tokens = jnp.asarray([[0, 3, 2, 0]])
  masked = jnp.asarray([[True, True, True, False]])
  probs = np.asarray(jax.nn.softmax(logits[0, :, :4]))
  entropies = -np.sum(probs * np.log(probs), axis=-1)
  mean, share = diffusion.certainty(logits, tokens, masked)
  np.testing.assert_allclose(float(mean), (entropies[0] + entropies[2]) / 2, rtol=1e-6)
  assert abs(float(mean) - entropies[:3].mean()) > 0.01  # the broken variant differs
  np.testing.assert_allclose(float(share), 2 / 3, rtol=1e-6)


def test_certainty_forcing_is_refused_outside_the_mdlm_loss():
  for kind in ("asarm", "learn2pd"):
    with pytest.raises(ValueError, match=f"certainty_weight=1.0 is a term of the mdlm loss, not of "
                                         f"kind '{kind}'"):
      dataclasses.replace(_diffusion(TINY, certainty_weight=1.0), kind=kind).validate()


def test_certainty_forcing_adds_its_weighted_term_and_lowers_the_entropy():
  """The loss is the ELBO plus weight x certainty on the same draw; a few steps with it leave
  the right predictions less uncertain than the same steps on the ELBO alone (and finite: the
  mask's -inf logit gives no NaN gradient)."""
  tokens = jnp.asarray(np.tile([[0, 1, 2, 3, 0, 1, 2, 3, 0]], (64, 1)), jnp.int32)
  plain_model = MaskedDiffusionLM(TINY)
  params = random_params(plain_model)
  forced = MaskedDiffusionLM(_diffusion(TINY, certainty_weight=2.0))
  key = jax.random.key(3)
  plain, _ = plain_model.loss(params, tokens, key)
  total, metrics = forced.loss(params, tokens, key)
  np.testing.assert_allclose(float(total), float(plain + 2.0 * metrics["certainty_entropy"]),
                             rtol=1e-6)
  entropy = {}
  for name, model in (("plain", plain_model), ("forced", forced)):
    p = params
    for step in range(30):
      grads = jax.grad(lambda q: model.loss(q, tokens, jax.random.key(step))[0])(p)
      p = jax.tree.map(lambda w, g: w - 0.05 * g, p, grads)
    _, metrics = forced.loss(p, tokens, key)
    assert np.isfinite(float(metrics["masked_nll"])) and float(metrics["correct_masked"]) > 0.2
    entropy[name] = float(metrics["certainty_entropy"])
  assert entropy["forced"] < 0.8 * entropy["plain"], entropy  # 0.57 against 1.29


def test_teacher_distillation_is_refused():
  model = MaskedDiffusionLM(TINY)
  with pytest.raises(ValueError, match="needs a causal model"):
    model.loss(None, jnp.zeros((1, 4), jnp.int32), jax.random.key(0), jnp.zeros((1, 3, VOCAB)))


@pytest.mark.slow
def test_trainer_lowers_the_elbo_and_resumes_bit_exactly(tmp_path):
  trainer, losses, evals = train("mdlm", tmp_path / "full")
  assert all(map(math.isfinite, evals.values())) and evals[8] < evals[0] - 0.5
  resumed = tmp_path / "resumed"
  shutil.copytree(tmp_path / "full", resumed)
  shutil.rmtree(resumed / "checkpoints" / "8")
  trainer.workdir = resumed
  result = trainer.run()
  assert result.step == 8 and math.isfinite(result.eval_bpb)
  assert cli.losses(resumed) == losses  # exact float equality, every step


@pytest.mark.slow
def test_learn2pd_trajectory_labels_and_frozen_denoiser():
  config = dataclasses.replace(_diffusion(BLOCK, block_size=0), kind="learn2pd",
                               finality=FinalityConfig(dim=8, steps=3))
  model = Learn2PD(config)
  params = random_params(model)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 11, (2, 9)), jnp.int32)
  state = tokens[:, :8].at[:, 3:].set(11)
  log_probs, finality = jax.jit(model.denoise_with_finality)(params, state)
  assert finality.shape == (2, 8)
  np.testing.assert_allclose(log_probs, jax.jit(model.denoise)(params, state), atol=1e-6)

  _, predictions, masked = jax.jit(model.trajectory)(params, tokens[:, :8])
  np.testing.assert_array_equal(masked.sum(-1), [[6, 6], [4, 4], [2, 2]])  # 2 prompt tokens
  assert not masked[:, :, :2].any()
  np.testing.assert_array_equal(predictions[:, :, :2], np.broadcast_to(tokens[:, :2], (3, 2, 2)))

  (loss, parts), grads = jax.jit(jax.value_and_grad(model.loss, has_aux=True))(
      params, tokens, jax.random.key(0))
  assert math.isfinite(float(loss)) and 0 < float(parts["final_rate"]) <= 1
  for path, grad in jax.tree_util.tree_leaves_with_path(grads):
    trained = path[0].key == "filter"
    assert (float(jnp.abs(grad).max()) > 0) == trained, path

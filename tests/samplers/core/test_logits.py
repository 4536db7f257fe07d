"""Logit processing: exact supports against brute force, distributions against chi-square."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from samplers.core.logits import SamplingParams, probs, process_logits, sample_token
from tests.samplers.stats import chi_square, chi_square_quantile

V = 10


def _logits(seed, rows=6):
  return np.random.default_rng(seed).normal(scale=2.0, size=(rows, V)).astype(np.float32)


def _softmax(x):
  z = np.exp(x - x.max(-1, keepdims=True))
  return z / z.sum(-1, keepdims=True)


def _brute_support(logits, temperature=1.0, top_k=0, top_p=1.0):
  """Support by definition: k largest, then the smallest most-likely prefix with mass >= p."""
  order = np.argsort(-logits)
  if top_k:
    order = order[:top_k]
  if top_p < 1:
    mass = np.cumsum(_softmax(logits[order].astype(np.float64) / temperature))
    assert np.all(np.abs(mass - top_p) > 1e-5), "p too close to a cumulative mass for float32"
    order = order[:np.argmax(mass >= top_p) + 1]
  return set(order.tolist())


def _support(p):
  return set(np.flatnonzero(np.asarray(p) > 0).tolist())


@pytest.mark.parametrize("top_k", range(1, V + 1))
def test_top_k_keeps_exactly_the_k_largest(top_k):
  logits = _logits(0)
  out = probs(jnp.asarray(logits), SamplingParams(top_k=top_k))
  for row in range(len(logits)):
    assert _support(out[row]) == _brute_support(logits[row], top_k=top_k)


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.62, 0.9, 0.995])
@pytest.mark.parametrize("temperature, top_k", [(1.0, 0), (0.7, 0), (1.5, 4)])
def test_top_p_keeps_the_smallest_set_with_enough_mass(top_p, temperature, top_k):
  logits = _logits(1)
  params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
  out = np.asarray(probs(jnp.asarray(logits), params))
  for row in range(len(logits)):
    support = _brute_support(logits[row], temperature, top_k, top_p)
    assert _support(out[row]) == support
    kept = np.array(sorted(support))
    expected = _softmax(logits[row, kept] / temperature)  # renormalised on the support
    np.testing.assert_allclose(out[row, kept], expected, rtol=1e-5)


def test_temperature_scales_logits():
  logits = _logits(2)
  out = probs(jnp.asarray(logits), SamplingParams(temperature=0.5))
  np.testing.assert_allclose(out, _softmax(logits / 0.5), rtol=1e-5, atol=1e-7)


def test_greedy_is_one_hot_argmax_whatever_the_key():
  logits = jnp.asarray(_logits(3), jnp.bfloat16)
  greedy = SamplingParams(temperature=0.0)
  out = probs(logits, greedy)
  assert out.dtype == jnp.float32
  np.testing.assert_array_equal(out, jax.nn.one_hot(jnp.argmax(logits, -1), V))
  for seed in range(3):
    np.testing.assert_array_equal(sample_token(jax.random.key(seed), logits, greedy),
                                  jnp.argmax(logits, -1))


def test_bfloat16_logits_are_processed_in_float32():
  logits = jnp.asarray(_logits(4), jnp.bfloat16)
  assert process_logits(logits, SamplingParams(top_p=0.9)).dtype == jnp.float32
  assert sample_token(jax.random.key(0), logits, SamplingParams()).dtype == jnp.int32


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.7),
                                    SamplingParams(temperature=1.3, top_k=6, top_p=0.9)])
def test_one_step_samples_follow_the_processed_distribution(params):
  """20k draws at a fixed seed; the statistic is compared with the chi-square 0.9999 quantile.
  Power: a shift of 0.01 between two outcomes of mass ~0.1 adds about 40 to the statistic."""
  logits = jnp.asarray(_logits(5, rows=1)[0] / 2)  # flatter, so that most outcomes are seen
  keys = jax.random.split(jax.random.key(0), 20_000)
  draws = jax.vmap(sample_token, in_axes=(0, None, None))(keys, logits, params)
  counts = np.bincount(np.asarray(draws), minlength=V)
  stat, dof = chi_square(counts, probs(logits, params))
  assert dof >= 3
  assert stat < chi_square_quantile(dof), (stat, dof)


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-1.0), "temperature must be >= 0"),
    (dict(top_k=-2), "top_k must be >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
])
def test_invalid_sampling_params_are_rejected(kwargs, message):
  with pytest.raises(ValueError, match=message):
    SamplingParams(**kwargs)

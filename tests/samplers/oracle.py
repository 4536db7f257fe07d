"""Exactness oracle: sampled continuations against the exact joint of a toy model.

Samples are the [R, N] token arrays of R rows; their empirical joint over the V^N continuations
is compared with the exact joint (`toy.exact_joint`) by Pearson's chi-square, with cells of
expected count < 5 pooled into one (`stats.chi_square`), and a p-value from scipy's chi-square
distribution. Seeds are fixed, so each test is deterministic; the thresholds say how surprising a
result would have to be for a correct sampler (SIGNIFICANCE) and how clearly a broken verifier
must be caught (POWER).
"""

import jax
import jax.numpy as jnp
import numpy as np
from scipy.stats import chi2

from samplers.core.logits import SamplingParams, probs
from tests.samplers.stats import chi_square

SIGNIFICANCE = 1e-3  # a correct sampler must give p > SIGNIFICANCE
POWER = 1e-9  # a deliberately broken verifier must give p < POWER
SAMPLES, CHUNK = 100_000, 50_000  # draws of one-row samplers, vmapped CHUNK at a time


def draw(sample_row, samples: int = SAMPLES) -> tuple[np.ndarray, dict]:
  """[samples, L] outputs of `sample_row(key) -> SampleOutput` (one row), vmapped in chunks of
  CHUNK, and their per-sample stats."""
  run = jax.jit(jax.vmap(sample_row))
  outs, stats = [], []
  for start in range(0, samples, CHUNK):
    out = run(jax.random.split(jax.random.key(start), min(CHUNK, samples - start)))
    outs.append(np.asarray(out.tokens[:, 0]))
    stats.append({k: np.asarray(v) for k, v in out.stats.items()})
  return np.concatenate(outs), {k: np.concatenate([s[k] for s in stats]) for k in stats[0]}


def distribution(sampling: SamplingParams):
  """logits [V] -> the sampling distribution [V] float64, computed as the samplers do."""
  return lambda logits: np.asarray(probs(jnp.asarray(logits, jnp.float32), sampling), np.float64)


def p_value(tokens, joint) -> tuple[float, float, int]:
  """(p-value, chi-square statistic, degrees of freedom) of tokens [R, N] against joint [V]*N."""
  tokens = np.asarray(tokens)
  counts = np.bincount(np.ravel_multi_index(tokens.T, joint.shape), minlength=joint.size)
  stat, dof = chi_square(counts, joint)
  return float(chi2.sf(stat, dof)), stat, dof


def assert_rows_follow_their_keys(run) -> None:
  """`run(order, keys)` samples 4 prompts in `order` with per-row `keys`: each row's output must
  follow its key whatever the batch order, and `jax.vmap` over key sets must equal separate runs."""
  keys = jax.random.split(jax.random.key(4), 4)
  forward = run(np.arange(4), keys)
  backward = run(np.arange(4)[::-1], keys[::-1])
  np.testing.assert_array_equal(forward.tokens, backward.tokens[::-1])
  np.testing.assert_array_equal(forward.lengths, backward.lengths[::-1])
  other_keys = jax.random.split(jax.random.key(5), 4)
  many = jax.vmap(lambda k: run(np.arange(4), k))(jnp.stack([keys, other_keys]))
  np.testing.assert_array_equal(many.tokens[0], forward.tokens)
  np.testing.assert_array_equal(many.lengths[0], forward.lengths)
  assert int(many.stats["target_calls"][0]) == int(forward.stats["target_calls"])
  assert np.any(np.asarray(many.tokens[1]) != np.asarray(forward.tokens))


def windows_p_value(tokens, joint, width: int = 2) -> float:
  """One p-value for tokens [R, N] against joint [V]*N that keeps its power for small biases on
  long generations: the full joint's chi-square (V^N cells, many pooled) and each window of
  `width` consecutive positions' marginal (V^width cells), Bonferroni-combined. A bias of ~1% per
  step spreads over thousands of joint cells, where chi-square is weak; a window's few cells
  concentrate it."""
  tokens = np.asarray(tokens)
  steps = joint.ndim
  p_values = [p_value(tokens, joint)[0]]
  for start in range(steps - width + 1):
    others = tuple(a for a in range(steps) if not start <= a < start + width)
    p_values.append(p_value(tokens[:, start:start + width], joint.sum(axis=others))[0])
  return min(1.0, len(p_values) * min(p_values))

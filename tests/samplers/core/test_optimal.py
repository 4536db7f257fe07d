"""Optimal multi-draft acceptance alpha*: brute force = sorted prefix = linear programme, k = 1 is
1 - TV, and k-sequential selection / recursive rejection lie between single-draft and alpha*."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linprog

from samplers.core import optimal, verify


def _pair(seed, vocab, sparse=False):
  rng = np.random.default_rng(seed)
  p, q = rng.dirichlet(np.ones(vocab)), rng.dirichlet(np.ones(vocab))
  if sparse:  # zeros in both, including a token outside both supports
    p[[0, 2]], q[[1, 2]] = 0.0, 0.0
  return jnp.asarray(p / p.sum(), jnp.float32), jnp.asarray(q / q.sum(), jnp.float32)


PAIRS = [_pair(seed, vocab, sparse) for seed in range(4) for vocab in (3, 5, 9)
         for sparse in (False, True)]


def _linear_programme(p, q, k) -> float:
  """Max-flow between y ~ p and k-tuples ~ q^k (edge when y is in the tuple), by scipy's LP."""
  p, q = np.float64(p), np.float64(q)
  tuples = list(itertools.product(range(len(p)), repeat=k))
  edges = [(y, t) for t, tup in enumerate(tuples) for y in set(tup)]
  rows = np.zeros((len(p) + len(tuples), len(edges)))
  for e, (y, t) in enumerate(edges):
    rows[y, e] = rows[len(p) + t, e] = 1.0
  bounds = np.concatenate([p, [np.prod(q[list(tup)]) for tup in tuples]])
  result = linprog(-np.ones(len(edges)), A_ub=rows, b_ub=bounds, bounds=(0, None), method="highs")
  return -result.fun


def _k_sequential_acceptance(p, q, k) -> float:
  beta = float(jnp.sum(jnp.minimum(q, p / verify.division_factor(p, q, k))))
  return 1 - (1 - beta) ** k


def _recursive_rejection_acceptance(p, q, k) -> float:
  """Exact acceptance of recursive rejection over k i.i.d. children, enumerating all k-tuples."""
  p, q = np.float64(p), np.float64(q)
  total = 0.0
  for children in itertools.product(range(len(p)), repeat=k):
    p_cur, rejected = p.copy(), 1.0
    for child in children:
      rejected *= 1 - min(1.0, p_cur[child] / q[child])
      rest = np.maximum(p_cur - q, 0.0)
      p_cur = rest / rest.sum() if rest.sum() > 0 else p_cur
    total += np.prod(q[list(children)]) * (1 - rejected)
  return total


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_sorted_prefix_equals_brute_force(k):
  for p, q in PAIRS:
    np.testing.assert_allclose(optimal.sorted_prefix(p, q, k), optimal.brute_force(p, q, k),
                               atol=1e-6)


def test_one_draft_gives_one_minus_total_variation():
  for p, q in PAIRS:
    single = float(jnp.sum(jnp.minimum(p, q)))
    np.testing.assert_allclose(optimal.optimal_acceptance(p, q, 1), single, atol=1e-6)
    np.testing.assert_allclose(single, 1 - 0.5 * float(jnp.sum(jnp.abs(p - q))), atol=1e-6)


@pytest.mark.parametrize("vocab, k", [(4, 2), (5, 3)])
def test_alpha_star_equals_the_linear_programme(vocab, k):
  for seed in range(3):
    p, q = _pair(100 + seed, vocab)
    np.testing.assert_allclose(optimal.optimal_acceptance(p, q, k), _linear_programme(p, q, k),
                               atol=1e-5)


def test_large_vocabularies_use_the_sorted_prefix():
  p, q = _pair(7, 300)
  alpha = float(optimal.optimal_acceptance(p, q, 4))
  assert alpha == pytest.approx(float(optimal.sorted_prefix(p, q, 4)))
  assert float(jnp.sum(jnp.minimum(p, q))) <= alpha <= 1.0


def test_k_sequential_and_recursive_rejection_lie_between_single_draft_and_alpha_star():
  """A V = 5, k = 3 example in the style of SpecTr's (there: 0.445 <= 0.670 <= 0.7112)."""
  for seed in range(6):
    p, q = _pair(200 + seed, 5)
    single = float(jnp.sum(jnp.minimum(p, q)))
    alpha = float(optimal.optimal_acceptance(p, q, 3))
    for rate in (_k_sequential_acceptance(p, q, 3), _recursive_rejection_acceptance(p, q, 3)):
      assert single - 1e-6 <= rate <= alpha + 1e-6, (seed, single, rate, alpha)
    assert _k_sequential_acceptance(p, q, 3) > single + 0.01  # strictly better here


def test_bad_arguments_are_rejected():
  with pytest.raises(ValueError, match="k \\(number of drafts\\) must be >= 1"):
    optimal.optimal_acceptance(*PAIRS[0], 0)
  with pytest.raises(ValueError, match="vocab <= 16"):
    optimal.brute_force(*_pair(0, 17), 2)

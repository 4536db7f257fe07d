"""Per-position verification rules: the emitted token is exactly ~ p (Monte Carlo, chi-square),
acceptance matches its closed form, and a broken rule is caught by the same test."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from samplers.core import verify
from tests.samplers.oracle import POWER, SIGNIFICANCE, p_value

TRIALS = 200_000
VOCAB = 6


def _dist(seed, zeros=()):
  """A random distribution [VOCAB] float32 (Dirichlet(1)) with the given tokens at zero."""
  d = np.random.default_rng(seed).dirichlet(np.ones(VOCAB))
  d[list(zeros)] = 0.0
  return jnp.asarray(d / d.sum(), jnp.float32)


P, Q = _dist(0), _dist(1)
P_SPARSE, Q_SPARSE = _dist(2, zeros=(0, 3)), _dist(3, zeros=(1,))  # disjoint-ish supports


@functools.partial(jax.jit, static_argnums=0)
def _trials(trial, keys, p, q, active):
  return jax.vmap(trial, in_axes=(0, None, None, None))(keys, p, q, active)


def _run(trial, p, q, active=(True,), seed=0):
  """trial(key, p, q, active [K]) -> (accepted or index, token), vmapped over TRIALS keys; one
  compile per trial and shape, whatever p and q. Drafts are drawn with jax.random, independently
  of the rules' own Gumbel-max."""
  keys = jax.random.split(jax.random.key(seed), TRIALS)
  return jax.tree.map(np.asarray, _trials(trial, keys, p, q, jnp.asarray(active)))


def _exact(tokens, p) -> float:
  return p_value(np.asarray(tokens)[:, None], np.asarray(p, np.float64))[0]


def _split(key, active):
  """(draft key, uniforms [K + V] for the rule) for K = len(active) proposals."""
  draft_key, verify_key = jax.random.split(key)
  return draft_key, verify.uniforms(verify_key, (active.shape[0] + VOCAB,))


def _single_draft_trial(key, p, q, active):
  draft_key, u = _split(key, active)
  draft = jax.random.categorical(draft_key, jnp.log(q)).astype(jnp.int32)
  return verify.single_draft(u, p, q, draft)


def _iid(key, q, count):
  return jax.random.categorical(key, jnp.log(q), shape=(count,)).astype(jnp.int32)


def _k_sequential_trial(key, p, q, active):
  draft_key, u = _split(key, active)
  return verify.k_sequential(u, p, q, _iid(draft_key, q, active.shape[0]), active)


def _wor(key, q, count):
  """count children drawn from q without replacement (Gumbel top-k)."""
  return jax.lax.top_k(jnp.log(q) + jax.random.gumbel(key, q.shape), count)[1].astype(jnp.int32)


def _top(key, q, count):
  """The count most likely tokens of q: deterministic children."""
  del key
  return jax.lax.top_k(q, count)[1].astype(jnp.int32)


def _iid_proposals(q, children):
  return jnp.broadcast_to(q, (children.shape[0],) + q.shape)


def _wor_proposals(q, children):
  return verify.without_replacement(q, children, jnp.ones(children.shape, bool))


def _point_masses(q, children):
  return jax.nn.one_hot(children, q.shape[0])


def _recursive(children, proposals):
  """A recursive-rejection trial: children(key, q, k) -> [k] tokens, proposals(q, children)."""
  def trial(key, p, q, active):
    draft_key, u = _split(key, active)
    drawn = children(draft_key, q, active.shape[0])
    return verify.recursive_rejection(u, p, proposals(q, drawn), drawn, active)
  return trial


RECURSIVE = {"iid": _recursive(_iid, _iid_proposals),
             "without_replacement": _recursive(_wor, _wor_proposals),
             "deterministic": _recursive(_top, _point_masses)}


def _beta(p, q, rho):
  return float(jnp.sum(jnp.minimum(q, p / rho)))


@pytest.mark.parametrize("p, q", [(P, Q), (P_SPARSE, Q_SPARSE)])
def test_single_draft_emits_p_and_accepts_sum_min(p, q):
  accepted, tokens = _run(_single_draft_trial, p, q)
  assert _exact(tokens, p) > SIGNIFICANCE
  rate = float(jnp.sum(jnp.minimum(p, q)))
  assert abs(accepted.mean() - rate) < 5 * np.sqrt(rate * (1 - rate) / TRIALS)


def test_single_draft_with_p_as_residual_is_caught(monkeypatch):
  monkeypatch.setattr(verify, "residual", lambda p, q: p)
  _, tokens = _run(lambda *args: _single_draft_trial(*args), P, Q)  # a fresh trace
  assert _exact(tokens, P) < POWER


def test_single_draft_greedy_accepts_exactly_the_argmax():
  p = jax.nn.one_hot(2, VOCAB)
  for draft in range(VOCAB):
    u = verify.uniforms(jax.random.key(draft), (1 + VOCAB,))
    accepted, token = verify.single_draft(u, p, jax.nn.one_hot(draft, VOCAB), jnp.int32(draft))
    assert bool(accepted) == (draft == 2) and int(token) == 2


def test_residual_is_the_normalised_positive_part():
  p, q = jnp.array([0.5, 0.3, 0.2]), jnp.array([0.2, 0.6, 0.2])
  np.testing.assert_allclose(verify.residual(p, q), [1.0, 0.0, 0.0], atol=1e-7)
  np.testing.assert_allclose(verify.residual(P, P), P)  # nothing to correct: p itself


def _bisect64(p, q, k):
  """float64 reference for the smallest feasible rho on [1, k]."""
  p, q = np.float64(p), np.float64(q)

  def feasible(rho):
    beta = np.minimum(q, p / rho).sum()
    return rho >= (1 - (1 - beta) ** k) / beta

  if feasible(1.0):
    return 1.0
  low, high = 1.0, float(k)
  for _ in range(100):
    middle = (low + high) / 2
    low, high = (low, middle) if feasible(middle) else (middle, high)
  return high


@pytest.mark.parametrize("k", [2, 3, 5])
def test_division_factor_is_the_smallest_feasible_root(k):
  for seed in range(5):
    p, q = _dist(10 + seed), _dist(20 + seed)
    rho = float(verify.division_factor(p, q, k))
    np.testing.assert_allclose(rho, _bisect64(p, q, k), rtol=1e-5)
    assert 1.0 < rho <= k
    # A rho 3% below the root leaves negative residual mass (Sun et al. 2023).
    below = 0.97 * rho
    scale = (1 - (1 - _beta(p, q, below)) ** k) / _beta(p, q, below)
    assert np.min(np.asarray(p) - np.minimum(q, p / below) * scale) < 0


def test_division_factor_is_one_for_one_draft_or_equal_distributions():
  assert float(verify.division_factor(P, Q, 1)) == 1.0
  assert float(verify.division_factor(P, P, 4)) == 1.0
  assert float(verify.division_factor(P, Q, jnp.int32(1), max_k=4)) == 1.0


@pytest.mark.parametrize("p, q, active", [(P, Q, [True] * 3),
                                          (P, Q, [True, False, True, True]),
                                          (P_SPARSE, Q_SPARSE, [True] * 3)])
def test_k_sequential_emits_p_and_accepts_as_derived(p, q, active):
  index, tokens = _run(_k_sequential_trial, p, q, active)
  assert _exact(tokens, p) > SIGNIFICANCE
  k = sum(active)
  beta = _beta(p, q, float(verify.division_factor(p, q, k)))
  rate = 1 - (1 - beta) ** k
  assert abs((index >= 0).mean() - rate) < 5 * np.sqrt(rate * (1 - rate) / TRIALS)
  assert np.all(np.asarray(active)[index[index >= 0]])  # only active drafts are accepted


def test_k_sequential_without_its_residual_correction_is_caught(monkeypatch):
  monkeypatch.setattr(verify, "k_sequential_residual", lambda p, q, rho, k, max_k: p)
  _, tokens = _run(lambda *args: _k_sequential_trial(*args), P, Q, [True] * 3)
  assert _exact(tokens, P) < POWER


def test_k_sequential_with_one_draft_is_single_draft():
  for seed in range(8):
    u, draft = verify.uniforms(jax.random.key(seed), (1 + VOCAB,)), jnp.int32(seed % VOCAB)
    index, token = verify.k_sequential(u, P, Q, draft[None], jnp.ones((1,), bool))
    accepted, single_token = verify.single_draft(u, P, Q, draft)
    assert bool(index == 0) == bool(accepted) and int(token) == int(single_token)


@pytest.mark.parametrize("kind", list(RECURSIVE))
def test_recursive_rejection_emits_p(kind):
  for p, q in [(P, Q), (P_SPARSE, Q_SPARSE)]:
    _, tokens = _run(RECURSIVE[kind], p, q, [True] * 3)
    assert _exact(tokens, p) > SIGNIFICANCE


def test_recursive_rejection_of_drafts_without_replacement_treated_as_iid_is_caught():
  _, tokens = _run(_recursive(_wor, _iid_proposals), P, Q, [True] * 3)
  assert _exact(tokens, P) < POWER


def test_without_replacement_removes_earlier_active_children():
  q = jnp.array([0.4, 0.3, 0.2, 0.1])
  qs = verify.without_replacement(q, jnp.array([1, 0, 2]), jnp.array([True, False, True]))
  np.testing.assert_allclose(qs, [[0.4, 0.3, 0.2, 0.1],
                                  [4 / 7, 0.0, 2 / 7, 1 / 7],   # inactive child 0 removes nothing
                                  [4 / 7, 0.0, 2 / 7, 1 / 7]], rtol=1e-6)

"""pass@k against brute-force enumeration of subsets, coverage curves, the power-law fit, plot."""

import itertools

import numpy as np
import pytest

from paxlike import coverage
from paxlike.errors import UserError


def test_pass_at_k_equals_the_subset_average():
  rng = np.random.default_rng(0)
  for n in range(1, 8):
    for c in range(n + 1):
      correct = rng.permutation([True] * c + [False] * (n - c))
      for k in range(1, n + 1):
        subsets = list(itertools.combinations(range(n), k))
        brute = np.mean([any(correct[list(s)]) for s in subsets])
        assert coverage.pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12), (n, c, k)


def test_bad_input():
  with pytest.raises(UserError, match="1 <= k <= n"):
    coverage.pass_at_k(4, 1, 5)
  with pytest.raises(UserError, match="n >= 1"):
    coverage.pass_at_k(0, 0, 1)
  with pytest.raises(UserError, match="correct samples"):
    coverage.pass_at_k(4, 5, 1)
  with pytest.raises(UserError, match=r"\[problems, n\]"):
    coverage.coverage_curve(np.ones(3, bool))
  with pytest.raises(UserError, match=r"\(0, 1\]"):
    coverage.fit_power_law({1: 0.0, 2: 0.5})


def test_curve_and_fit_recover_a_power_law():
  correct = np.array([[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], bool)
  curve = coverage.coverage_curve(correct)
  assert list(curve) == [1, 2, 4]
  assert curve[1] == pytest.approx((0.25 + 0 + 1) / 3) and curve[4] == pytest.approx(2 / 3)
  truth = {k: float(np.exp(-1.3 * k**-0.6)) for k in (1, 2, 4, 8, 16, 32, 64)}
  fit = coverage.fit_power_law(truth)
  assert fit.a == pytest.approx(-1.3, abs=1e-3) and fit.b == pytest.approx(-0.6, abs=1e-3)
  assert fit.rmse < 1e-6 and fit(8) == pytest.approx(truth[8], abs=1e-5)


def test_plot(tmp_path):
  import matplotlib
  matplotlib.use("Agg")
  curve = {k: float(np.exp(-1.3 * k**-0.6)) for k in (1, 2, 4, 8)}
  ax = coverage.plot_coverage(curve, coverage.fit_power_law(curve))
  assert len(ax.lines) == 2
  ax.figure.savefig(tmp_path / "coverage.png")
  assert (tmp_path / "coverage.png").stat().st_size > 0

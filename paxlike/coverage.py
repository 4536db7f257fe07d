"""Coverage metrics for repeated sampling: unbiased pass@k, coverage curves, a scaling fit, a plot.

pass@k is the chance that at least one of k samples is correct. From n >= k samples of which c
are correct, the unbiased estimator (Chen et al. 2021, "Evaluating Large Language Models Trained
on Code") is 1 - C(n-c, k) / C(n, k), computed in the stable product form
1 - prod_{i=n-c+1}^{n} (1 - k/i) (Chen et al. 2021, the unbiased pass@k estimator), which is exactly 1 when n - c < k.

Coverage over a set of problems is the mean pass@k. Large Language Monkeys (Brown et al. 2024)
observe that coverage grows with the number of samples k roughly as an exponentiated power law,
C(k) = exp(a * k^b) with a < 0, b < 0; `fit_power_law` fits it and `plot_coverage` draws the
measured curve with the fit (matplotlib, imported only when called: `pip install paxlike[notebooks]`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from paxlike.errors import UserError


def pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased pass@k from n samples with c correct (1 <= k <= n, 0 <= c <= n)."""
  if n < 1:
    raise UserError(f"pass@k needs n >= 1 samples, got n={n}")
  if not 1 <= k <= n:
    raise UserError(f"pass@k needs 1 <= k <= n; got k={k} with n={n} samples (draw more samples "
                    "or lower k)")
  if not 0 <= c <= n:
    raise UserError(f"the number of correct samples must be in [0, n={n}], got c={c}")
  if n - c < k:
    return 1.0
  i = np.arange(n - c + 1, n + 1, dtype=np.float64)
  return float(1.0 - np.prod(1.0 - k / i))


def coverage(correct, k: int) -> float:
  """Mean pass@k over problems; correct: [problems, n] bool, sample j of problem i correct."""
  correct = _check_correct(correct)
  n = correct.shape[1]
  return float(np.mean([pass_at_k(n, int(c), k) for c in correct.sum(axis=1)]))


def coverage_curve(correct, ks: Sequence[int] | None = None) -> dict[int, float]:
  """{k: coverage at k} for ks (default: 1, 2, 4, ... up to n, and n itself)."""
  correct = _check_correct(correct)
  n = correct.shape[1]
  if ks is None:
    ks = sorted({2**i for i in range(int(np.log2(n)) + 1)} | {n})
  return {int(k): coverage(correct, int(k)) for k in ks}


def _check_correct(correct) -> np.ndarray:
  correct = np.asarray(correct, bool)
  if correct.ndim != 2 or correct.shape[0] < 1 or correct.shape[1] < 1:
    raise UserError(f"correct must be [problems, n] booleans with n >= 1 samples, got shape "
                    f"{correct.shape}")
  return correct


@dataclasses.dataclass(frozen=True)
class PowerLawFit:
  """C(k) = exp(a * k^b) fitted to a coverage curve (least squares on log C).

  Attributes:
    a, b: the fitted parameters (a <= 0; b < 0 for a curve that saturates at 1).
    rmse: root mean squared error of log C over the fitted points.
  """

  a: float
  b: float
  rmse: float

  def __call__(self, k) -> np.ndarray:
    return np.exp(self.a * np.asarray(k, np.float64) ** self.b)


def fit_power_law(curve: dict[int, float]) -> PowerLawFit:
  """Fits C(k) = exp(a * k^b) (Brown et al. 2024) to {k: coverage} with 0 < coverage.

  For a fixed b, log C = a * k^b is linear in a (closed-form least squares); b is found by a grid
  over [-3, 3] refined by golden-section search. Points with coverage 0 cannot be fitted
  (log 0) and raise; points at coverage 1 fit any a at b < 0 and are kept.
  """
  ks = np.asarray(sorted(curve), np.float64)
  values = np.asarray([curve[int(k)] for k in ks], np.float64)
  if len(ks) < 2:
    raise UserError(f"fitting coverage needs at least two values of k, got {len(ks)}")
  if np.any(values <= 0) or np.any(values > 1):
    raise UserError("coverage values must be in (0, 1] to fit exp(a * k^b); got "
                    f"{dict(zip(ks.astype(int).tolist(), values.tolist()))}")
  y = np.log(values)

  def solve(b: float) -> tuple[float, float]:
    x = ks**b
    a = min(float(x @ y / (x @ x)), 0.0)
    return a, float(np.sqrt(np.mean((a * x - y) ** 2)))

  grid = np.linspace(-3.0, 3.0, 121)
  best = grid[int(np.argmin([solve(b)[1] for b in grid]))]
  lo, hi = best - 0.05, best + 0.05
  ratio = (np.sqrt(5.0) - 1) / 2
  for _ in range(60):
    m1, m2 = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    if solve(m1)[1] < solve(m2)[1]:
      hi = m2
    else:
      lo = m1
  b = (lo + hi) / 2
  a, rmse = solve(b)
  return PowerLawFit(a=a, b=float(b), rmse=rmse)


def plot_coverage(curve: dict[int, float], fit: PowerLawFit | None = None, ax=None,
                  label: str = "coverage"):
  """Draws coverage against k (log-scaled k axis) and the fitted law; returns the matplotlib axes.

  matplotlib is optional (`pip install paxlike[notebooks]`); it is imported here.
  """
  try:
    import matplotlib.pyplot as plt
  except ImportError:
    raise UserError("plot_coverage needs matplotlib: pip install 'paxlike[notebooks]'") from None
  if ax is None:
    _, ax = plt.subplots(figsize=(5, 3.5))
  ks = np.asarray(sorted(curve))
  ax.plot(ks, [curve[int(k)] for k in ks], "o-", label=label)
  if fit is not None:
    dense = np.geomspace(ks.min(), ks.max(), 100)
    ax.plot(dense, fit(dense), "--", label=f"exp({fit.a:.2f} k^{fit.b:.2f})")
  ax.set_xscale("log", base=2)
  ax.set_xlabel("samples k")
  ax.set_ylabel("coverage (pass@k)")
  ax.set_ylim(0, 1.02)
  ax.legend()
  return ax

"""Goodness-of-fit helpers for exactness tests (numpy only)."""

import numpy as np


def chi_square(counts, probs, min_expected: float = 5.0) -> tuple[float, int]:
  """Pearson chi-square statistic of observed counts against exact probabilities.

  Outcomes whose expected count is below `min_expected` are pooled into one cell so that the
  chi-square approximation holds. An observation where probs == 0 makes the statistic infinite.

  Args:
    counts: [K] observed counts (any shape; flattened).
    probs: [K] exact probabilities summing to 1.
  Returns:
    (statistic, degrees of freedom).
  """
  counts = np.asarray(counts, np.float64).ravel()
  probs = np.asarray(probs, np.float64).ravel()
  expected = counts.sum() * probs
  pooled = (expected < min_expected) & (probs > 0)
  cells = [(counts[~pooled & (probs > 0)], expected[~pooled & (probs > 0)])]
  if pooled.any():
    cells.append((counts[pooled].sum(keepdims=True), expected[pooled].sum(keepdims=True)))
  observed, expected = (np.concatenate(c) for c in zip(*cells))
  stat = np.sum((observed - expected) ** 2 / expected)
  if np.any(counts[probs == 0] > 0):
    stat = np.inf
  return float(stat), len(expected) - 1


def chi_square_quantile(dof: int, z: float = 3.719) -> float:
  """Upper quantile of chi-square(dof) by Wilson-Hilferty; z=3.719 is the 0.9999 normal quantile.

  Slightly above the exact quantile for small dof (21.8 vs 21.1 at dof=3), i.e. conservative.
  """
  c = 2.0 / (9.0 * dof)
  return dof * (1.0 - c + z * np.sqrt(c)) ** 3

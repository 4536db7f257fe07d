"""Timing several compiled functions fairly on a noisy machine: interleaved rounds."""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence


def interleaved_times(fns: Sequence[Callable[[], Any]],
                      repeats: int) -> tuple[list[list[float]], list[Any]]:
  """(wall seconds of each fn's calls, each fn's last result) of `repeats` rounds that call every
  fn once, back to back (each fn must block until its result is ready). The fns of one round share
  the machine's state at that moment, so ratios between them are steady under background load and
  clock drift that move sequential medians by 20% on a shared VM."""
  times: list[list[float]] = [[] for _ in fns]
  last: list[Any] = [None] * len(fns)
  for _ in range(repeats):
    for i, fn in enumerate(fns):
      start = time.perf_counter()
      last[i] = fn()
      times[i].append(time.perf_counter() - start)
  return times, last

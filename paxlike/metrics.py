"""Run output: `metrics.jsonl` (one JSON object per line) and the live progress line."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from paxlike import atomic


class MetricsLog:
  """Appends JSON lines to `DIR/metrics.jsonl` (floats at full precision), flushed per line.

  Only one process of a multi-process run writes (`enabled`); the others' calls do nothing.
  """

  def __init__(self, path: Path, enabled: bool = True):
    self.path = path
    self.enabled = enabled
    self._file: TextIO | None = None

  def truncate_after(self, step: int) -> None:
    """Drops lines past `step` (left by a run that died after its last checkpoint)."""
    if not self.enabled or not self.path.exists():
      return
    kept = [line for line in self.path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    atomic.write_text(self.path, "".join(line + "\n" for line in kept))

  def write(self, record: dict[str, Any]) -> None:
    if not self.enabled:
      return
    if self._file is None:
      self._file = open(self.path, "a")
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None


def read_metrics(path: Path) -> list[dict[str, Any]]:
  """All records of a metrics.jsonl file."""
  return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
  """One progress line (step, loss, tokens/s, ETA), redrawn in place on a terminal."""

  def __init__(self, total_steps: int, tokens_per_step: int, stream: TextIO | None = sys.stdout):
    """`stream=None` makes it silent (processes other than 0 of a multi-process run)."""
    self.total = total_steps
    self.tokens_per_step = tokens_per_step
    self.stream = stream if stream is not None else open(os.devnull, "w")
    self.live = self.stream.isatty()
    self._start_time: float | None = None
    self._start_step = 0
    self.tokens_per_s = float("nan")

  def start(self, step: int) -> None:
    """Marks the step the rates are measured from (call before the first timed step)."""
    self._start_time, self._start_step = time.perf_counter(), step

  def update(self, step: int, loss: float, extra: str = "") -> None:
    """Prints the line; the rate is averaged over the steps since `start` (compile included
    only in the first)."""
    now = time.perf_counter()
    if self._start_time is not None and step > self._start_step:
      self.tokens_per_s = (step - self._start_step) * self.tokens_per_step / (now - self._start_time)
    eta = ((self.total - step) * self.tokens_per_step / self.tokens_per_s
           if self.tokens_per_s > 0 else float("nan"))
    line = (f"step {step}/{self.total} | loss {loss:.4f} | {self.tokens_per_s:,.0f} tok/s | "
            f"eta {format_duration(eta)}{extra}")
    if self.live:
      self.stream.write("\r\033[K" + line)
    else:
      self.stream.write(line + "\n")
    self.stream.flush()

  def message(self, text: str) -> None:
    """A line of its own that does not overwrite the progress line."""
    if self.live:
      self.stream.write("\n")
    self.stream.write(text + "\n")
    self.stream.flush()

  def finish(self) -> None:
    if self.live:
      self.stream.write("\n")
      self.stream.flush()

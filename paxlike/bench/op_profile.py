"""Per-operation profile of one compiled call, from `jax.profiler` and the compiled HLO.

XLA runs a compiled program as a sequence of thunks (fusions, matmuls, scatters, loops); with the
profiler on, each thunk is one timed event named after its HLO instruction. The optimised HLO text
names the source scope of every instruction (`metadata={op_name="jit(sample)/while/body/
Transformer.decode/blocks_0/mlp/up/dot_general"}`), so each event can be charged to what the
program was doing: a model call (a scope under the model's module, `Transformer.`) or the decode
engine around it (sampling, verification, bookkeeping, loop control).

The time between two events (the executor dispatching the next thunk) is charged to the later
event, so the categories add up to the profiled wall time. Profiling adds a little time per
event; shares are what to read, not absolute times.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import tempfile
from pathlib import Path
from typing import Any, Callable

import jax

_OP_NAME = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?metadata=\{[^}]*op_name=\"([^\"]+)\"")
# Thunks that only run other thunks (their events enclose their bodies' events).
_CONTAINERS = ("while", "conditional", "call")
MODEL_SCOPE = "Transformer."


@dataclasses.dataclass(frozen=True)
class OpTime:
  """One HLO instruction's total time over the profiled call."""
  op: str
  scope: str  # its source scope (op_name), jit prefix and loop nesting removed
  category: str  # "model" or "engine"
  seconds: float
  count: int


def hlo_scopes(hlo_text: str) -> dict[str, str]:
  """Instruction name -> op_name scope, from a compiled program's HLO text."""
  scopes = {}
  for line in hlo_text.splitlines():
    match = _OP_NAME.match(line)
    if match:
      scopes.setdefault(match.group(1), match.group(2))
  return scopes


def _short(scope: str) -> str:
  """Drops the jit(...) prefix and while/body/cond nesting, keeping the meaningful tail."""
  parts = [p for p in scope.split("/") if not p.startswith("jit(") and p not in
           ("while", "body", "cond", "branch_0_fun", "branch_1_fun", "checkpoint")]
  return "/".join(parts) or scope


def _executor_line(planes) -> list[Any]:
  """The thunk events of the line that ran the most of them (the executor's thread)."""
  best: list[Any] = []
  for plane in planes:
    for line in plane.lines:
      events = [e for e in line.events if dict(e.stats).get("hlo_op") is not None]
      if len(events) > len(best):
        best = events
  return best


def profile(run: Callable[[], Any], hlo_text: str) -> list[OpTime]:
  """Runs `run()` once (already compiled and warm) under the profiler; per-instruction times.

  Returns the instructions sorted by time, each with its scope and category; the dispatch gap
  before a thunk is part of its time.
  """
  from jax.profiler import ProfileData  # pylint: disable=g-import-not-at-top
  scopes = hlo_scopes(hlo_text)
  with tempfile.TemporaryDirectory() as folder:
    with jax.profiler.trace(folder):
      run()
    files = sorted(Path(folder).rglob("*.xplane.pb"))
    if not files:
      raise RuntimeError(f"the profiler wrote no trace under {folder}")
    events = _executor_line(ProfileData.from_file(str(files[0])).planes)
  leaves = sorted(((e.start_ns, e.duration_ns, dict(e.stats)["hlo_op"]) for e in events
                   if not dict(e.stats)["hlo_op"].startswith(_CONTAINERS)), key=lambda t: t[0])
  totals: dict[str, float] = collections.defaultdict(float)
  counts: collections.Counter = collections.Counter()
  previous_end = leaves[0][0] if leaves else 0.0
  for start, duration, op in leaves:
    end = start + duration
    totals[op] += max(end - previous_end, duration) * 1e-9
    counts[op] += 1
    previous_end = max(previous_end, end)
  out = []
  for op, seconds in totals.items():
    scope = scopes.get(op, op)
    category = "model" if MODEL_SCOPE in scope else "engine"
    out.append(OpTime(op, _short(scope), category, seconds, counts[op]))
  return sorted(out, key=lambda o: -o.seconds)


def shares(ops: list[OpTime]) -> dict[str, float]:
  """Seconds per category and in all: {"model": ..., "engine": ..., "total": ...}."""
  out = {"model": 0.0, "engine": 0.0}
  for op in ops:
    out[op.category] += op.seconds
  out["total"] = out["model"] + out["engine"]
  return out


def top(ops: list[OpTime], count: int = 12) -> list[dict[str, Any]]:
  """The `count` most expensive instructions as table rows (share of the profiled total)."""
  total = sum(o.seconds for o in ops) or 1.0
  return [{"op": o.op, "category": o.category, "share": round(o.seconds / total, 4),
           "us_per_run": round(o.seconds * 1e6, 1), "executions": o.count, "scope": o.scope[-90:]}
          for o in ops[:count]]

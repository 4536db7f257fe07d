"""Per-operation profile of one compiled call, from `jax.profiler` and the compiled HLO.

XLA runs a compiled program as a sequence of thunks (fusions, matmuls, scatters, loops); with the
profiler on, each thunk is one timed event named after its HLO instruction. The optimised HLO text
names the source scope of every instruction (`metadata={op_name="jit(sample)/while/body/
Transformer.decode/blocks_0/mlp/up/dot_general"}`), so each event can be charged to what the
program was doing: a model call (a scope under the model's module, `Transformer.`) or the decode
engine around it (sampling, verification, bookkeeping, loop control).

XLA's CPU runtime runs independent thunks concurrently on its thread pool, so events from every
thread are merged: time when several thunks run is split among them, and time when none runs
(the executor dispatching the next one) is charged to the next, so the categories add up to the
profiled wall time. Profiling adds a little time per event; shares are what to read, not
absolute times.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import tempfile
from pathlib import Path
from typing import Any, Callable

import jax

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*)$")
_COMPUTATION = re.compile(r"^\s*(?:ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$")
_SCOPE = re.compile(r"op_name=\"([^\"]+)\"")
_CALLS = re.compile(r"calls=%([\w.\-]+)")
_OPERAND = re.compile(r"%([\w.\-]+)")
_DOT = re.compile(r"\S+\s+dot\(")  # an instruction's body: "f32[8,4]{1,0} dot(%a, %b), ..."
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


def _instructions(hlo_text: str):
  """(computation, instruction name, the text after its '=') of every instruction in HLO text."""
  computation = None
  for line in hlo_text.splitlines():
    instruction = _INSTRUCTION.match(line)
    if instruction is None:
      header = _COMPUTATION.match(line)
      computation = header.group(1) if header else computation
      continue
    yield (computation, *instruction.groups())


def hlo_scopes(hlo_text: str) -> dict[str, str]:
  """Instruction name -> op_name scope, from a compiled program's HLO text.

  XLA's passes drop the metadata of some instructions they create (a fusion's wrapper, a copy
  they insert, a rewritten dot); those take the scope of the instructions their fused computation
  holds, else of their operands, so that every thunk is charged somewhere sensible.
  """
  scopes, operands, calls, members = {}, {}, {}, {}
  for computation, name, body in _instructions(hlo_text):
    members.setdefault(computation, []).append(name)
    scope = _SCOPE.search(body)
    if scope:
      scopes[name] = scope.group(1)
    called = _CALLS.search(body)
    if called:
      calls[name] = called.group(1)
    head = body.split("metadata=")[0]
    operands[name] = _OPERAND.findall(head[head.find("("):]) if "(" in head else []
  for _ in range(8):  # propagate to a fixed point (operand chains are short)
    changed = False
    for name, args in operands.items():
      if name in scopes:
        continue
      inner = [scopes[m] for m in members.get(calls.get(name), []) if m in scopes]
      found = inner[-1] if inner else next((scopes[a] for a in args if a in scopes), None)
      if found is not None:
        scopes[name] = found
        changed = True
    if not changed:
      break
  return scopes


def _short(scope: str) -> str:
  """Drops the jit(...) prefix and while/body/cond nesting, keeping the meaningful tail."""
  parts = [p for p in scope.split("/") if not p.startswith("jit(") and p not in
           ("while", "body", "cond", "branch_0_fun", "branch_1_fun", "checkpoint")]
  return "/".join(parts) or scope


def _thunk_events(planes) -> list[tuple[float, float, str]]:
  """(start ns, end ns, instruction) of every thunk event on every thread: XLA's CPU runtime
  runs independent thunks of one program concurrently on its thread pool."""
  out = []
  for plane in planes:
    for line in plane.lines:
      for event in line.events:
        op = dict(event.stats).get("hlo_op")
        if op is not None and not op.startswith(_CONTAINERS):
          out.append((event.start_ns, event.start_ns + event.duration_ns, op))
  return sorted(out)


def _charge(events: list[tuple[float, float, str]]) -> dict[str, float]:
  """Seconds charged to each instruction: every instant between the first start and the last end
  is split equally among the thunks running then; an instant when none runs (dispatch) goes to
  the next thunk to start. So the charges add up to the profiled wall time."""
  charged: dict[str, float] = collections.defaultdict(float)
  if not events:
    return charged
  points = sorted({t for start, end, _ in events for t in (start, end)})
  starts = collections.defaultdict(list)
  ends = collections.defaultdict(list)
  for index, (start, end, _) in enumerate(events):
    starts[start].append(index)
    ends[end].append(index)
  active: set[int] = set()
  pending_gap = 0.0
  for left, right in zip(points, points[1:]):
    active -= set(ends[left])
    new = starts[left]
    if new and pending_gap:
      charged[events[new[0]][2]] += pending_gap
      pending_gap = 0.0
    active |= set(new)
    width = (right - left) * 1e-9
    if not active:
      pending_gap += width
      continue
    for index in active:
      charged[events[index][2]] += width / len(active)
  return charged


def matmul_instructions(hlo_text: str) -> set[str]:
  """Names of the instructions that multiply matrices: dots, and fusions whose computation holds
  one (XLA:CPU's YNNPACK/XNNPACK fusions of a dot with its elementwise neighbours)."""
  dots, computations_with_dot, calls = set(), set(), {}
  for computation, name, body in _instructions(hlo_text):
    if _DOT.match(body):
      dots.add(name)
      computations_with_dot.add(computation)
    called = _CALLS.search(body)
    if called:
      calls[name] = called.group(1)
  return dots | {name for name, called in calls.items() if called in computations_with_dot}


def busy_split(events: list[tuple[float, float, str]], matmuls: set[str]) -> dict[str, float]:
  """Seconds of the profiled span when a matmul runs (`matmul_s`), when only other thunks run
  (`other_s`) and when none runs (`idle_s`: the runtime dispatching the next thunk).

  Unlike `_charge`, which splits concurrent time between the thunks that share it (so a cheap
  reduction running beside a matmul looks expensive), this says what the step would lose if
  everything but its matmuls were free."""
  out = {"matmul_s": 0.0, "other_s": 0.0, "idle_s": 0.0}
  changes = collections.defaultdict(lambda: [0, 0])  # time -> [thunks, matmuls] starting - ending
  for start, end, op in events:
    for time, sign in ((start, 1), (end, -1)):
      changes[time][0] += sign
      changes[time][1] += sign * (op in matmuls)
  running = [0, 0]
  points = sorted(changes)
  for left, right in zip(points, points[1:]):
    running = [running[0] + changes[left][0], running[1] + changes[left][1]]
    key = "idle_s" if not running[0] else "matmul_s" if running[1] else "other_s"
    out[key] += (right - left) * 1e-9
  return out


def trace_events(run: Callable[[], Any]) -> list[tuple[float, float, str]]:
  """Runs `run()` once (already compiled and warm) under the profiler: its thunk events."""
  from jax.profiler import ProfileData  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as folder:
    with jax.profiler.trace(folder):
      run()
    files = sorted(Path(folder).rglob("*.xplane.pb"))
    if not files:
      raise RuntimeError(f"the profiler wrote no trace under {folder}")
    return _thunk_events(ProfileData.from_file(str(files[0])).planes)


def profile(run: Callable[[], Any], hlo_text: str) -> list[OpTime]:
  """Runs `run()` once (already compiled and warm) under the profiler; per-instruction times.

  Returns the instructions sorted by time, each with its scope and category; time when no thunk
  runs (dispatch) is charged to the next thunk, time when several run is split among them.
  """
  scopes = hlo_scopes(hlo_text)
  events = trace_events(run)
  counts = collections.Counter(op for _, _, op in events)
  out = []
  for op, seconds in _charge(events).items():
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

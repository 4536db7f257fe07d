"""Shared benchmark plumbing: timing, machine description, tables and the JSON report."""

from __future__ import annotations

import json
import os
import platform
import statistics
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from paxlike import config as config_lib
from paxlike.checkpointing import Checkpointer
from paxlike.timing import interleaved_times  # re-exported for the suites
from paxlike.config import Experiment
from paxlike.run import Run
from paxlike.train import Trainer

_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy")


def machine() -> dict[str, Any]:
  """What ran the benchmark."""
  devices = jax.devices()
  return {
      "platform": platform.platform(),
      "processor": platform.processor() or platform.machine(),
      "cpu_count": os.cpu_count(),
      "backend": jax.default_backend(),
      "device_kind": devices[0].device_kind,
      "device_count": len(devices),
      "python": platform.python_version(),
  }


def versions() -> dict[str, str]:
  out = {}
  for name in _PACKAGES:
    try:
      out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      out[name] = "not installed"
  return out


def time_calls(fn: Callable[[], Any], repeats: int) -> dict[str, float]:
  """Median, min and max wall seconds of `fn()` (which must block until its result is ready)."""
  (times,), _ = interleaved_times([fn], repeats)
  return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}


def matmul_peak_flops(size: int = 1024, repeats: int = 10) -> float:
  """This machine's measured float32 matmul throughput (FLOP/s) on the default device."""
  a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
  matmul = jax.jit(lambda x, y: x @ y)
  matmul(a, b).block_until_ready()
  timing = time_calls(lambda: matmul(a, b).block_until_ready(), repeats)
  return 2 * size**3 / timing["min_s"]


def _cell(value: Any) -> str:
  if isinstance(value, float):
    return f"{value:,.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
  return str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] = ()) -> str:
  """A Markdown table of `rows` (the given columns, or every key in first-seen order), for docs:
  `python -m paxlike.bench table REPORT.json` prints one from a suite's JSON report."""
  columns = list(columns) or list(dict.fromkeys(k for row in rows for k in row))
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |" for row in rows]
  return "\n".join(lines)


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
  """A fixed-width table of the given columns."""
  cells = [[_cell(r.get(c, "")) for c in columns] for r in rows]
  widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
  print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
  print("  ".join("-" * w for w in widths))
  for row in cells:
    print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def write_report(out: str | None, suite: str, config: dict[str, Any],
                 rows: list[dict[str, Any]]) -> dict[str, Any]:
  report = {"suite": suite, "machine": machine(), "versions": versions(), "config": config,
            "rows": rows}
  if out:
    write_json(out, report)
  return report


def write_json(out: str, report: dict[str, Any]) -> None:
  """Writes a report as indented JSON (creating the folder) and says where."""
  Path(out).parent.mkdir(parents=True, exist_ok=True)
  Path(out).write_text(json.dumps(report, indent=2) + "\n")
  print(f"wrote {out}")


def trained(exp: Experiment, workdir: Path) -> Run:
  """The run of experiment `exp` in `workdir`, trained there first unless its last step is
  already saved (the suites' model cache)."""
  exp = config_lib.validate(exp)
  workdir.mkdir(parents=True, exist_ok=True)
  trainer = Trainer(exp, workdir)
  run = Run(workdir, exp)
  run.write_config(exp)
  checkpointer = Checkpointer(workdir, exp.checkpoint)
  done = checkpointer.latest_step() == exp.train.steps
  checkpointer.close()
  if not done:
    print(f"training {exp.name} in {workdir} (cached for later runs)", flush=True)
    trainer.run()
  return run

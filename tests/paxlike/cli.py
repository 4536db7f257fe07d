"""Runs `python -m paxlike.main` (or `paxlike.bench`) in a subprocess, as a user would, or its
`main` in this process for inputs refused before any model work."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

from tests import xla

REPO = Path(__file__).resolve().parents[2]
SHAKESPEARE = REPO / "configs" / "data" / "tinyshakespeare.txt"


def env() -> dict[str, str]:
  """One CPU device, quiet TF-style logs, and the repository importable."""
  e = dict(os.environ)
  e["XLA_FLAGS"] = xla.flags(1)
  e["JAX_PLATFORMS"] = "cpu"
  e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
  return e


def command(*args: str, module: str = "paxlike.main") -> list[str]:
  return [sys.executable, "-m", module, *args]


def run(*args: str, module: str = "paxlike.main", timeout: int = 300) -> subprocess.CompletedProcess:
  return subprocess.run(command(*args, module=module), capture_output=True, text=True,
                        env=env(), cwd=REPO, timeout=timeout)


def run_in_process(*args: str) -> subprocess.CompletedProcess:
  """`paxlike.main.main` with these flags, in this process, its output captured.

  For the bad inputs `main` refuses before it trains, restores or samples (unknown names, bad
  values, unusable workdirs, corpora or prompts): the same code path and message as the command
  line, without a new interpreter and jax import (about 3 s each). Anything else still escapes
  as an exception, so a traceback fails the test as it would in a subprocess.
  """
  from absl import flags
  from paxlike import main
  flags.FLAGS.unparse_flags()
  flags.FLAGS(["paxlike.main", *args])
  stdout, stderr = io.StringIO(), io.StringIO()
  try:
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
      code = main.main(["paxlike.main"])
  finally:
    flags.FLAGS.unparse_flags()
  return subprocess.CompletedProcess(args, code, stdout.getvalue(), stderr.getvalue())


def popen(*args: str, **kwargs) -> subprocess.Popen:
  return subprocess.Popen(command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=env(), cwd=REPO, **kwargs)


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
  """A clean failure: non-zero exit, one `error:` line naming the culprit, no traceback."""
  assert result.returncode != 0, result.stdout + result.stderr
  assert "Traceback" not in result.stderr, result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert errors, result.stderr
  message = result.stderr[result.stderr.index("error: "):]
  for fragment in fragments:
    assert fragment in message, f"{fragment!r} not in {message!r}"
  return message


def last_json(stdout: str) -> dict:
  """The JSON object on the last non-empty line of stdout."""
  return json.loads([line for line in stdout.splitlines() if line.strip()][-1])


def losses(workdir: Path) -> dict[int, float]:
  """step -> training loss from metrics.jsonl."""
  records = [json.loads(l) for l in (Path(workdir) / "metrics.jsonl").read_text().splitlines() if l]
  return {r["step"]: r["loss"] for r in records if "loss" in r}

"""Killed at any moment (SIGKILL mid-run, mid-save) or stopped (SIGTERM), a run resumes bit-identically."""

import re
import signal
import time
from pathlib import Path

import pytest

from tests.paxlike import cli

STEPS = 40
ARGS = ("--exp=tiny", "--set", f"train.steps={STEPS}", "--set", "checkpoint.every_steps=5",
        "--set", "run.log_every=1")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, float]:
  """Losses of an uninterrupted run."""
  workdir = tmp_path_factory.mktemp("reference")
  result = cli.run(*ARGS, f"--workdir={workdir}")
  assert result.returncode == 0, result.stderr
  got = cli.losses(workdir)
  assert sorted(got) == list(range(1, STEPS + 1))
  return got


def _completed(workdir: Path) -> list[int]:
  folder = workdir / "checkpoints"
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.exists() else []


def _in_flight(workdir: Path) -> list[Path]:
  folder = workdir / "checkpoints"
  return [p for p in folder.iterdir() if "tmp" in p.name] if folder.exists() else []


def _kill_when(workdir: Path, condition, sig=signal.SIGKILL, timeout=240.0):
  process = cli.popen(*ARGS, f"--workdir={workdir}")
  start = time.time()
  fired = False
  while process.poll() is None and time.time() - start < timeout:
    if condition():
      process.send_signal(sig)
      fired = True
      break
    time.sleep(0.0005)
  stdout, stderr = process.communicate(timeout=timeout)
  assert fired, f"the run ended before the kill condition held:\n{stderr[-2000:]}"
  return process.returncode, stdout, stderr


def _resume_and_compare(workdir: Path, reference: dict[int, float]) -> str:
  result = cli.run(*ARGS, f"--workdir={workdir}")
  assert result.returncode == 0, result.stderr
  assert re.search(r"resumed from step \d+", result.stdout), result.stdout
  got = cli.losses(workdir)
  assert got == reference  # exact float equality, every step
  return result.stdout


def test_sigkill_mid_run_resumes_bit_identically(tmp_path, reference):
  metrics = tmp_path / "metrics.jsonl"
  condition = lambda: metrics.exists() and metrics.read_text().count("\n") >= 13
  code, _, _ = _kill_when(tmp_path, condition)
  assert code == -signal.SIGKILL
  assert max(cli.losses(tmp_path)) < STEPS
  _resume_and_compare(tmp_path, reference)


def test_sigkill_during_an_in_flight_save_resumes_bit_identically(tmp_path, reference):
  condition = lambda: bool(_completed(tmp_path)) and bool(_in_flight(tmp_path))
  code, _, _ = _kill_when(tmp_path, condition)
  assert code == -signal.SIGKILL
  assert _in_flight(tmp_path), "the kill should have left a partial (temporary) checkpoint"
  last_complete = max(_completed(tmp_path))
  out = _resume_and_compare(tmp_path, reference)
  assert f"resumed from step {last_complete}" in out
  assert not _in_flight(tmp_path)  # the partial save was cleaned up, complete ones kept


def test_sigterm_saves_and_exits_cleanly(tmp_path, reference):
  metrics = tmp_path / "metrics.jsonl"
  condition = lambda: metrics.exists() and metrics.read_text().count("\n") >= 7
  code, stdout, stderr = _kill_when(tmp_path, condition, sig=signal.SIGTERM)
  assert code == 0, stderr
  assert "Traceback" not in stderr
  match = re.search(r"received SIGTERM: saved checkpoint at step (\d+)", stdout)
  assert match, stdout
  step = int(match.group(1))
  assert step in _completed(tmp_path)
  out = _resume_and_compare(tmp_path, reference)
  assert f"resumed from step {step}" in out

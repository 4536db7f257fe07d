"""2 processes x 4 CPU devices over loopback (gloo) train, checkpoint and resume like 1 process x 8.

The 2-process mesh puts its data axis across processes (`mesh.dcn_data=2`), as on 2 slices.
"""

import os
import socket
import subprocess

import pytest

from tests import xla
from tests.paxlike import cli

pytestmark = pytest.mark.slow
# A schedule that does not depend on train.steps, so a shorter first leg follows the same curve.
ARGS = ("--exp=tiny", "--set", "schedule.kind=constant", "--set", "schedule.warmup_steps=2",
        "--set", "checkpoint.every_steps=3",
        "--set", "mesh.data=2", "--set", "mesh.fsdp=2", "--set", "mesh.tensor=2")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_processes(workdir, steps: int, processes: int = 2, devices: int = 4) -> list[str]:
  port = _free_port()
  env = cli.env()
  env["XLA_FLAGS"] = xla.flags(devices)
  procs = [subprocess.Popen(
      cli.command(*ARGS, "--set", "mesh.dcn_data=2", "--set", f"train.steps={steps}",
                  f"--workdir={workdir}",
                  f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}",
                  f"--process_id={i}"),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cli.REPO)
      for i in range(processes)]
  outputs = []
  for p in procs:
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    outputs.append(out)
  return outputs


def test_two_processes_match_one_and_resume(tmp_path):
  single = tmp_path / "single"
  env = cli.env()
  env["XLA_FLAGS"] = xla.flags(8)
  result = subprocess.run(cli.command(*ARGS, "--set", "train.steps=6", f"--workdir={single}"),
                          capture_output=True, text=True, env=env, cwd=cli.REPO, timeout=300)
  assert result.returncode == 0, result.stderr
  reference = cli.losses(single)

  multi = tmp_path / "multi"
  first = _run_processes(multi, steps=4)
  # Gloo's own connection lines ("... peer ranks is : 1") are not ours; under load their final
  # number can arrive as a line of its own.
  own_lines = [l for l in first[1].splitlines()
               if l.strip() and "peer ranks" not in l and not l.strip().isdigit()]
  assert "step 4/4" in first[0] and not own_lines  # only process 0 reports
  data_states = sorted(os.listdir(multi / "checkpoints" / "3" / "data"))
  assert "process_0-of-2.json" in data_states and "process_1-of-2.json" in data_states
  second = _run_processes(multi, steps=6)
  assert "resumed from step 4" in second[0]
  got = cli.losses(multi)
  assert sorted(got) == list(range(1, 7))
  for step, loss in reference.items():
    assert got[step] == pytest.approx(loss, rel=1e-5), (step, got, reference)

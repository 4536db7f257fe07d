"""A checkpoint saved on one mesh restores onto another mesh shape and device count."""

import subprocess

import pytest

from tests import xla
from tests.paxlike import cli


def _run(devices: int, *args: str) -> subprocess.CompletedProcess:
  env = cli.env()
  env["XLA_FLAGS"] = xla.flags(devices)
  result = subprocess.run(cli.command(*args), capture_output=True, text=True, env=env,
                          cwd=cli.REPO, timeout=300)
  assert result.returncode == 0, result.stderr
  return result


@pytest.mark.slow
def test_saved_on_8_devices_as_data2_tensor4_restores_on_4_as_fsdp4(tmp_path):
  train = ("--exp=tiny", f"--workdir={tmp_path}", "--set", "train.steps=4",
           "--set", "checkpoint.every_steps=4")
  _run(8, *train, "--set", "mesh.data=2", "--set", "mesh.tensor=4")
  on_8 = cli.last_json(_run(8, f"--workdir={tmp_path}", "--mode=eval", "--set", "mesh.data=2",
                            "--set", "mesh.tensor=4").stdout)
  on_4 = cli.last_json(_run(4, f"--workdir={tmp_path}", "--mode=eval", "--set", "mesh.data=1",
                            "--set", "mesh.fsdp=4", "--set", "mesh.tensor=1").stdout)
  assert on_4["step"] == on_8["step"] == 4
  assert on_4["eval_loss"] == pytest.approx(on_8["eval_loss"], rel=1e-6)
  resumed = _run(4, *train[:-4], "--set", "train.steps=6", "--set", "mesh.data=1",
                 "--set", "mesh.fsdp=4", "--set", "mesh.tensor=1")
  assert "resumed from step 4" in resumed.stdout

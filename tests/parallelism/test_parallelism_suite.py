"""`paxlike.bench parallelism`: rows, memory ordering, and the command line (small lengths)."""

import json
import subprocess

from paxlike.bench import parallelism_suite
from tests import xla
from tests.paxlike import cli


def test_suite_reports_memory_and_time_per_attention(tmp_path):
  out = tmp_path / "parallelism.json"
  report = parallelism_suite.run(str(out), seq_lens=(256,), timed_up_to=256, repeats=1)
  assert json.loads(out.read_text()) == report and report["suite"] == "parallelism"
  rows = {row["attention"]: row for row in report["rows"]}
  assert set(rows) == set(parallelism_suite.ATTENTIONS)
  for row in rows.values():
    assert row["seq_len"] == 256 and row["fwd_bwd_s"] > 0 and row["temp_bytes_per_device"] > 0
    assert row["devices"] == (1 if row["attention"] == "dense" else 8)
  assert rows["ring"]["temp_bytes_per_device"] < 0.5 * rows["dense"]["temp_bytes_per_device"]


def test_command_line_simulates_devices_and_skips_timing_past_the_limit(tmp_path):
  out = tmp_path / "parallelism.json"
  env = cli.env()
  env["XLA_FLAGS"] = xla.COMPILE_FAST  # no device count: the suite sets 8 simulated devices
  result = subprocess.run(
      cli.command("parallelism", "--seq_lens=128", "--timed_up_to=0", f"--out={out}",
                  module="paxlike.bench"),
      capture_output=True, text=True, env=env, cwd=cli.REPO, timeout=300)
  assert result.returncode == 0, result.stderr
  rows = json.loads(out.read_text())["rows"]
  assert {row["devices"] for row in rows} == {1, 8}
  assert all(row["fwd_bwd_s"] is None for row in rows)

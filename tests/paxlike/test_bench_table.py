"""`python -m paxlike.bench table REPORT.json`: a suite's JSON rows as the Markdown of docs/."""

import json
import subprocess
import sys

from paxlike.bench import harness


def test_markdown_table_has_every_column_and_formats_numbers():
  rows = [{"sampler": "ar", "speedup": 1.0}, {"sampler": "tree", "speedup": 2.34567, "x": 3}]
  assert harness.markdown_table(rows).splitlines() == [
      "| sampler | speedup | x |", "|---|---|---|", "| ar | 1 |  |", "| tree | 2.346 | 3 |"]
  assert harness.markdown_table(rows, ["x"]).splitlines()[2:] == ["|  |", "| 3 |"]


def test_the_table_command_reads_a_report_and_refuses_other_files(tmp_path):
  report = tmp_path / "r.json"
  report.write_text(json.dumps({"suite": "decode", "rows": [{"a": 1, "b": "x"}]}))
  run = lambda *args: subprocess.run([sys.executable, "-m", "paxlike.bench", "table", *args],
                                     capture_output=True, text=True)
  out = run(str(report), "--columns=b,a")
  assert out.returncode == 0 and out.stdout.splitlines()[2] == "| x | 1 |"
  bad = run(str(tmp_path / "missing.json"))
  assert bad.returncode == 2 and "is not a bench report" in bad.stderr
  assert "Traceback" not in bad.stderr

"""`python -m paxlike.bench train --out F` writes its report."""

import json

from paxlike.bench import harness
from paxlike.bench.train_suite import train_flops_per_token
from models.config import ModelConfig
from tests.paxlike import cli


def test_flops_count_matches_hand_count():
  m = ModelConfig(vocab_size=10, num_layers=1, d_model=4, num_heads=2, num_kv_heads=1, mlp_dim=8)
  # q,o: 2 * 4*2*2; k,v: 2 * 4*1*2; mlp: 3 * 4*8; head: 4*10 -> 32 + 16 + 96 + 40 = 184
  assert train_flops_per_token(m, seq_len=3) == 6 * 184 + 12 * 1 * 3 * 2 * 2


def test_train_suite_writes_json(tmp_path):
  out = tmp_path / "train.json"
  result = cli.run("train", "--experiments=tiny", "--steps=2", f"--out={out}",
                   module="paxlike.bench")
  assert result.returncode == 0, result.stderr
  report = json.loads(out.read_text())
  assert report["suite"] == "train" and report["versions"]["jax"]
  row = report["rows"][0]
  assert row["experiment"] == "tiny" and row["tokens_per_s"] > 0 and 0 < row["mfu"] < 1.5
  assert row["compile_s"] > 0 and row["step_s_min"] <= row["step_s"] <= row["step_s_max"]


def test_unknown_suite_is_a_clear_error():
  result = cli.run("nope", module="paxlike.bench")
  assert result.returncode != 0 and "suites: train" in result.stderr


def test_interleaved_times_alternate_the_calls_round_by_round():
  calls = []
  fns = [lambda: calls.append("ar") or len(calls), lambda: calls.append("spec") or -len(calls)]
  (ar_times, spec_times), last = harness.interleaved_times(fns, 3)
  assert calls == ["ar", "spec"] * 3  # each pair shares the machine's state at that moment
  assert len(ar_times) == len(spec_times) == 3 and min(ar_times + spec_times) >= 0
  assert last == [5, -6]

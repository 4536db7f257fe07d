"""`python -m paxlike.bench train --out F` writes its report."""

import json

import pytest

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
  shares = [row["matmul_share"], row["other_share"], row["idle_share"]]
  assert row["matmul_share"] > 0 and sum(shares) == pytest.approx(1.0)
  assert row["matmul_floor_s"] > 0
  assert row["step_over_floor"] == pytest.approx(row["step_s"] / row["matmul_floor_s"])


def test_unknown_suite_is_a_clear_error():
  result = cli.run("nope", module="paxlike.bench")
  assert result.returncode != 0 and "suites: train" in result.stderr


def test_list_flags_that_are_not_numbers_are_named():
  """One line naming the flag and its value, exit 2, before any work (no bare traceback)."""
  for suite, flag, kind in (("serve", "--concurrency=one", "an integer"),
                            ("serve", "--rates=fast", "a number"),
                            ("decode", "--batches=8,x", "an integer"),
                            ("engine", "--engine_batches=1.5", "an integer"),
                            ("parallelism", "--seq_lens=long", "an integer")):
    result = cli.run(suite, flag, module="paxlike.bench")
    assert result.returncode == 2, (suite, flag, result.stderr)
    assert f"{flag}: each value must be {kind}" in result.stderr
    assert "Traceback" not in result.stderr


def test_interleaved_times_alternate_the_calls_round_by_round():
  calls = []
  fns = [lambda: calls.append("ar") or len(calls), lambda: calls.append("spec") or -len(calls)]
  (ar_times, spec_times), last = harness.interleaved_times(fns, 3)
  assert calls == ["ar", "spec"] * 3  # each pair shares the machine's state at that moment
  assert len(ar_times) == len(spec_times) == 3 and min(ar_times + spec_times) >= 0
  assert last == [5, -6]


@pytest.mark.slow
def test_engine_suite_writes_floors_overheads_and_profiles(tmp_path):
  out = tmp_path / "engine.json"
  result = cli.run("engine", "--shapes=0.07M", "--engine_batches=1,2", "--targets=0.07M",
                   "--batches=1", "--max_new_tokens=8", f"--out={out}", module="paxlike.bench")
  assert result.returncode == 0, result.stderr
  report = json.loads(out.read_text())
  ar = [r for r in report["rows"] if "shape" in r]
  assert [r["batch"] for r in ar] == [1, 2] and ar[0]["vs_batch_1"] == 1.0
  assert all(r["ar_ms"] > 0 and r["chain_ms"] > 0 and r["of_chain"] > 0 for r in ar)
  drafted = {r["sampler"]: r for r in report["rows"] if "sampler" in r}
  assert set(drafted) == {"ar", "speculative", "spectr", "tree", "dynamic_tree", "adaptive"}
  assert all(0 < r["model_share"] <= 1 and r["overhead_ratio"] >= 1 for r in drafted.values())
  assert set(report["profiles"]) == {"ar 0.07M batch 1", "speculative 0.07M batch 1"}

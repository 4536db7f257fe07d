"""`python -m paxlike.bench decode`: trains the pair (shortened here), writes its rows."""

import json

import pytest

from paxlike.bench import decode_suite
from paxlike.errors import UserError


def test_an_unknown_sampler_is_named_before_anything_trains(tmp_path):
  with pytest.raises(UserError, match="--samplers: nope not in the decode suite; valid: "):
    decode_suite.run(str(tmp_path), None, samplers=("eagle", "nope"))
  assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_decode_suite_rows(tmp_path, capsys):
  """Its time is compiling: about 30 decoders, seven trainers and the teacher text's samplers, on
  one-layer models; the rows are those of the full suite."""
  out = tmp_path / "decode.json"
  small = ("model.num_layers=1", "model.d_model=128", "model.num_heads=4", "model.mlp_dim=256",
           "eval.batches=1")
  report = decode_suite.run(str(tmp_path / "cache"), str(out), max_new_tokens=12, batches=(3,),
                            repeats=2, train_steps=(3, 2), target_overrides=small,
                            draft_overrides=("model.num_layers=1", "eval.batches=1"))
  assert json.loads(out.read_text())["suite"] == "decode"
  rows = report["rows"]
  assert {r["sampler"] for r in rows} == {"ar", *decode_suite.SAMPLERS}
  assert {(r["batch"], r["temperature"]) for r in rows} == {(3, 0.0), (3, 1.0)}
  assert {r["text"] for r in rows} == set(decode_suite.TEXTS)
  assert {r["sampler"] for r in rows if r["text"] == "repeating"} == {"ar", *decode_suite.DRAFT_FREE}
  assert all(r["temperature"] == 0.0 for r in rows if r["sampler"] in decode_suite.GREEDY_ONLY
             or "tree_nodes=6" in r["setting"])  # "eagle/tree" in GREEDY_ONLY
  eagle = [r["setting"] for r in rows if r["sampler"] == "eagle"]
  assert sum("tree_nodes=6" in s for s in eagle) == 1 and len(set(eagle)) == 3, eagle  # tree: T=0
  for row in rows:
    for key in ("tokens_per_s", "tokens_per_target_call", "speedup_vs_ar", "near_ties", "setting"):
      assert key in row
    low, high = row["speedup_range"]  # over the interleaved (AR, sampler) pairs
    assert 0 < low <= row["speedup_vs_ar"] <= high
    if row["temperature"] == 0.0:
      assert row["greedy_equal_ar"] or row["near_ties"] > 0, row
  capsys.readouterr()
  overrides = ["train.steps=3", "checkpoint.every_steps=3", *small]
  cached = decode_suite.trained("pair_target", tmp_path / "cache" / "pair_target", overrides)
  assert "training" not in capsys.readouterr().out  # the suite's model cache is reused
  assert cached.restore().step == 3

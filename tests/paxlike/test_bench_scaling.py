"""`python -m paxlike.bench scaling`: the suite's core on a tiny untrained model (row shape, fields,
invariants), held-out prompt selection and bad input."""

import jax
import numpy as np
import pytest

from models.causal_lm import CausalLM
from models.config import ModelConfig
from paxlike import tasks
from paxlike.bench import scaling_suite
from paxlike.errors import UserError

TINY = CausalLM(ModelConfig(num_layers=1, d_model=16, num_heads=2, num_kv_heads=2, mlp_dim=32,
                            max_len=48))


def test_held_out_prompts_avoid_the_corpus(tmp_path):
  corpus = tasks.write_corpus(tmp_path / "corpus.txt", 400, 0, ["add", "dyck"])
  seen = scaling_suite.corpus_prompts(corpus)
  assert "dyck 8=" in seen and all(p.endswith("=") for p in seen)
  prompts, fresh = scaling_suite.held_out(tasks.TASKS["add"], 20, seen)
  assert fresh and len(set(prompts)) == 20 and not set(prompts) & seen
  prompts, fresh = scaling_suite.held_out(tasks.TASKS["dyck"], 3, seen)  # its only prompt is seen
  assert not fresh and prompts == ["dyck 8="] * 3


def test_ns_must_divide_the_largest():
  with pytest.raises(UserError, match="divide the largest"):
    scaling_suite.evaluate(TINY, None, tasks.get(["add"]), 1, ns=(1, 3, 4))


@pytest.mark.slow
def test_rows_of_every_task_method_and_n():
  params = TINY.init(jax.random.key(0))
  names, ns = ["add", "dyck"], (1, 2)
  rows = scaling_suite.evaluate(TINY, params, tasks.get(names), 2, ns=ns)
  assert {(r["task"], r["method"], r["n"]) for r in rows} == {
      (t, m, n) for t in [*names, "all"] for m in scaling_suite.METHODS for n in ns}
  for row in rows:
    for field in ("accuracy", "chance_accuracy", "model_calls", "single_sample_accuracy",
                  "generated_tokens", "wall_s"):
      assert field in row, (row, field)
    assert 0 <= row["accuracy"] <= 1 and row["model_calls"] >= 2
    if row["task"] != "all":
      assert row["chance_accuracy"] == tasks.TASKS[row["task"]].chance
    if row["method"] == "pass_at_k":
      assert row["pass_at_k"] == row["accuracy"]
      if row["n"] == 1:
        assert row["pass_at_k"] == row["single_sample_accuracy"]
    if row["method"] in ("first_finish", "reward_pruned"):
      assert "compute_saved_vs_best_of_n" in row and "model_calls_saved_vs_best_of_n" in row
  passes = {(r["task"], r["n"]): r["pass_at_k"] for r in rows if r["method"] == "pass_at_k"}
  assert all(passes[t, 1] <= passes[t, 2] for t in names)
  best = {r["n"]: r["model_calls"] for r in rows if r["method"] == "best_of_n"}
  vote = {r["n"]: r["model_calls"] for r in rows if r["method"] == "majority_vote"}
  assert all(best[n] == vote[n] + 1 for n in ns)  # best-of-n adds one scoring pass
  all_rows = {(r["method"], r["n"]): r["accuracy"] for r in rows if r["task"] == "all"}
  for (method, n), accuracy in all_rows.items():
    per_task = [r["accuracy"] for r in rows if r["method"] == method and r["n"] == n
                and r["task"] != "all"]
    assert accuracy == pytest.approx(np.mean(per_task), abs=1e-4)

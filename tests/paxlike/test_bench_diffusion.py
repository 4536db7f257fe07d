"""`python -m paxlike.bench diffusion`: trains its six models (a few steps here) and writes rows."""

import json

import pytest
from absl import flags

from paxlike import tasks
from paxlike.bench import diffusion_drafted_rows, diffusion_models, diffusion_suite
from paxlike.errors import UserError


SMALL = ("model.num_layers=1", "model.d_model=32", "model.mlp_dim=64")  # every model: 1 x 32


@pytest.mark.slow
def test_diffusion_suite_rows(tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(diffusion_suite, "CORPUS_LINES", 20_000)  # 4 steps read 256 of its lines
  out = tmp_path / "diffusion.json"
  chosen = ("topk/k=1", "topk/k=8 (one call)", "block/block-causal, cached, L=8, k=1",
            "learned/tau=0.9", "assd/g=4, reuse, T=1", "edlm/S=1, K=8, T=1", "distilled/k=1",
            "distilled/k=8 (one call)", "distilled/margin >= 0.2 (4 slots)",
            "fast_dllm/dual cache, L=8, k=1", "diffusion_drafted/g=4",
            "certain/tau=0.9", "apd/R=0.8, g=8", "speculative/g=4")  # one row per property
  report = diffusion_suite.run(str(tmp_path), str(out), examples=2, train_steps=4, repeats=1,
                               only=chosen, model_overrides=SMALL)
  assert json.loads(out.read_text())["suite"] == "diffusion"
  rows = report["rows"]
  names = {t.name for t in tasks.get()} | {"all"}
  assert {f"{r['sampler']}/{r['setting']}" for r in rows} == set(chosen)
  assert {r["task"] for r in rows} == names
  for row in [r for r in rows if r["sampler"] in ("diffusion_drafted", "speculative")]:
    assert row["greedy_equal_ar"] and row["exact"] and row["speedup_vs_ar"] > 0, row
    assert 1.0 <= row["tokens_per_target_call"] <= 1 + row["num_draft_tokens"], row
  for row in [r for r in rows if r["sampler"] == "apd"]:
    assert not row["exact"] and 1.0 <= row["tokens_per_target_call"] <= 1 + row[
        "num_draft_tokens"], row
  for row in [r for r in rows if r["sampler"] not in diffusion_drafted_rows.KINDS]:
    assert 0.0 <= row["task_accuracy"] <= 1.0 and row["tokens_per_call"] > 0, row
    if row["sampler"] in ("topk", "distilled") and row["setting"] == "k=1":
      assert row["tokens_per_call"] == 1.0
    if row["sampler"] in ("topk", "distilled", "learned"):  # a batch waits for its slowest row
      assert row["row_tokens_per_call"] >= row["tokens_per_call"] - 1e-3, row
    if row["sampler"] == "distilled" and row["setting"] == "k=8 (one call)":
      assert row["steps"] == 1.0
    assert row["chance_accuracy"] > 0 and row["gen_ppl"] > 0
    if row["sampler"] == "block" and row["setting"].startswith("block-causal"):
      assert row["cache_deviation"] == 0.0  # the block-causal model's cache is exact
    if row["sampler"] in ("block", "fast_dllm"):
      assert 0 <= row["cache_deviation"] <= 1 and 0 <= row["cache_free_accuracy"] <= 1, row
    if row["sampler"] == "edlm" and row["setting"].startswith("S=1,"):  # + one AR energy call
      assert row["tokens_per_call_with_energy"] == pytest.approx(row["tokens_per_call"] / 2, abs=2e-3)
    elif row["sampler"] != "edlm":
      assert row["tokens_per_call_with_energy"] == row["tokens_per_call"]
  reuse = [r for r in rows if r["sampler"] == "assd" and "reuse" in r["setting"]]
  assert reuse and all(r["exact"] for r in reuse)
  config = report["config"]["models"]
  assert {(m["num_layers"], m["d_model"]) for m in config.values()} == {(1, 32)}  # SMALL, all
  diffusion = {name: model["diffusion"] for name, model in config.items()}
  assert diffusion["asarm"]["response_after"] == "=" and diffusion["mdlm_block"]["block_size"] == 8
  assert diffusion["mdlm_student"]["min_t"] == diffusion_models.ONE_CALL_MIN_T  # stage 2
  assert diffusion["mdlm_student"]["min_t_rows"] == diffusion_models.ONE_CALL_ROWS
  assert diffusion["mdlm_student_stage1"]["min_t"] == diffusion["mdlm"]["min_t"]
  assert diffusion["mdlm_certain"]["certainty_weight"] == diffusion_models.CERTAINTY_WEIGHT
  assert diffusion["mdlm_student"]["certainty_weight"] == 0.0
  assert diffusion["mdlm_certain"]["min_t"] == diffusion_models.ONE_CALL_MIN_T
  student = (tmp_path / "diffusion" / "4_steps" / "self_answers.txt").read_bytes()
  assert len(student) % diffusion_models.SEQ_LEN == 0  # whole windows of the teacher's answers
  with pytest.raises(UserError, match="unknown sampler"):
    diffusion_suite.run(str(tmp_path), None, only=("topk", "nope"))
  capsys.readouterr()
  diffusion_models.models(tmp_path / "diffusion", tmp_path / "diffusion" / "tasks_20000.txt", 4,
                         SMALL)
  assert "training" not in capsys.readouterr().out  # the suite's model cache is reused


@pytest.mark.slow
def test_long_suite_trains_its_own_models_on_wider_lines(tmp_path, monkeypatch):
  monkeypatch.setattr(diffusion_suite, "LONG_CORPUS_LINES", 5_000)
  chosen = ("topk/k=1", "topk/k=16 (one call)", "threshold/margin >= 0.2",
            "fast_dllm/dual cache, L=8, tau=0.9")
  report = diffusion_suite.run(str(tmp_path), None, examples=2, train_steps=4, repeats=1,
                               only=chosen, model_overrides=SMALL, suite="long")
  rows = report["rows"]
  assert {f"{r['sampler']}/{r['setting']}" for r in rows} == set(chosen)
  assert {r["task"] for r in rows} == {t.name for t in tasks.get(suite="long")} | {"all"}
  config = report["config"]
  assert config["suite"] == "long" and config["line_width"] == tasks.LONG_WIDTH
  assert set(config["models"]) == {"mdlm", "ar"}
  assert {m["max_len"] for m in config["models"].values()} == {2 * tasks.LONG_WIDTH}
  one_call = [r for r in rows if r["setting"] == "k=16 (one call)"]
  assert one_call and all(r["steps"] == 1.0 for r in one_call)  # add8's 9 tokens: one call too
  assert all(r["tokens_per_call"] == 1.0 for r in rows if r["setting"] == "k=1")
  assert (tmp_path / "diffusion" / "long" / "4_steps" / "tasks_mdlm").is_dir()
  with pytest.raises(UserError, match="unknown sampler.*of the long suite.*fast_dllm, greedy"):
    diffusion_suite.run(str(tmp_path), None, only=("assd",), suite="long")
  with pytest.raises(UserError, match="unknown diffusion suite 'huge'; valid: short, long"):
    diffusion_suite.run(str(tmp_path), None, suite="huge")


def test_prompt_seed_draws_other_prompts_of_the_same_shape():
  task = tasks.get(["perm"])[0]
  canvas, prompts = diffusion_suite.canvases(task, 8, mask_id=259)
  other, other_prompts = diffusion_suite.canvases(task, 8, mask_id=259, seed=30_000)
  assert canvas.shape == other.shape and set(prompts) != set(other_prompts)
  assert prompts == [p for p, _ in task.examples(8, seed=diffusion_suite.PROMPT_SEED)]


def test_an_unknown_setting_is_named_before_any_training():
  keep = diffusion_suite.selection(("distilled/margin >= 0.2 (4 slots)",))
  assert keep(diffusion_suite.Sampler("distilled", "margin >= 0.2 (4 slots)", None, (), None))
  with pytest.raises(UserError, match="unknown sampler.*distilled/nope.*name/setting"):
    diffusion_suite.selection(("distilled/nope",))


def test_a_quoted_setting_with_commas_selects_its_row_from_the_cli_list():
  """`--samplers` is an absl list: a double-quoted item keeps its commas (the flag's help)."""
  only = flags.ListParser().parse('topk/k=1,"fast_dllm/dual cache, L=8, k=1"')
  assert only == ["topk/k=1", "fast_dllm/dual cache, L=8, k=1"]
  keep = diffusion_suite.selection(tuple(only))
  assert keep(diffusion_suite.Sampler("fast_dllm", "dual cache, L=8, k=1", None, (), None))
  assert not keep(diffusion_suite.Sampler("fast_dllm", "dual cache, L=8, tau=0.9", None, (), None))


def test_only_the_models_of_the_chosen_samplers_are_trained():
  keep = diffusion_suite.selection(("fast_dllm", "topk/k=1"))
  assert diffusion_suite.needed_models(keep) == {"mdlm", "ar"}
  keep = diffusion_suite.selection(("block/block-causal, cached, L=8, k=1", "edlm"))
  assert diffusion_suite.needed_models(keep) == {"mdlm", "mdlm_block", "ar"}
  assert diffusion_suite.needed_models(diffusion_suite.selection(())) == set(
      diffusion_models.SAMPLER_MODELS)


def test_model_overrides_set_model_fields_only(tmp_path):
  with pytest.raises(UserError, match="model.* fields only.*train.steps=1"):
    diffusion_models.models(tmp_path, tmp_path / "corpus.txt", 8, ("train.steps=1",))

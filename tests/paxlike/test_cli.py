"""The command line end to end: training, eval, sampling, and every bad input's one clear message."""

import json
import shutil

import pytest

from tests.paxlike import cli

TINY = ("--exp=tiny", "--set", "train.steps=20", "--set", "checkpoint.every_steps=10")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny model trained for 20 steps on tinyshakespeare (checkpoints at 10 and 20)."""
  workdir = tmp_path_factory.mktemp("trained")
  result = cli.run(*TINY, f"--workdir={workdir}")
  assert result.returncode == 0, result.stderr
  return workdir


def test_train_writes_config_metrics_and_checkpoints(trained):
  stored = json.loads((trained / "config.json").read_text())
  assert stored["name"] == "tiny" and stored["train"]["steps"] == 20
  records = [json.loads(l) for l in (trained / "metrics.jsonl").read_text().splitlines()]
  steps = [r["step"] for r in records if "loss" in r]
  assert steps == list(range(1, 21))  # tiny logs every step
  assert any("eval_loss" in r and "eval_bpb" in r for r in records)
  assert sorted(p.name for p in (trained / "checkpoints").iterdir()) == ["10", "20"]


def test_training_lowers_held_out_loss(tmp_path):
  result = cli.run("--exp=tiny", "--set", "train.steps=60", "--set", "eval.every_steps=20",
                   f"--workdir={tmp_path}")
  assert result.returncode == 0, result.stderr
  records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  evals = {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}
  assert sorted(evals) == [0, 20, 40, 60]
  assert evals[60] < evals[0] - 1.0, evals


def test_restart_resumes_and_extends(trained, tmp_path):
  workdir = tmp_path / "copy"
  shutil.copytree(trained, workdir)
  result = cli.run("--exp=tiny", "--set", "train.steps=25", "--set", "checkpoint.every_steps=10",
                   f"--workdir={workdir}")
  assert result.returncode == 0, result.stderr
  assert "resumed from step 20" in result.stdout
  assert max(cli.losses(workdir)) == 25


def test_eval_prints_json(trained):
  result = cli.run(f"--workdir={trained}", "--mode=eval")
  assert result.returncode == 0, result.stderr
  report = cli.last_json(result.stdout)
  assert report["step"] == 20 and report["eval_bpb"] > 0


def test_sample_prints_text_and_json_stats(trained):
  result = cli.run(f"--workdir={trained}", "--mode=sample", "--prompt=ROMEO:", "--prompt=To be",
                   "--set", "sampler.max_new_tokens=24", "--set", "sampler.temperature=0")
  assert result.returncode == 0, result.stderr
  assert "ROMEO:" in result.stdout and "To be" in result.stdout
  stats = cli.last_json(result.stdout)
  assert stats["batch"] == 2 and 0 < stats["tokens"] <= 48
  assert stats["model_calls"] >= 1 and stats["tokens_per_s"] > 0


# ----------------------------------------------------------------------------- bad input
# Inputs refused before any model work run `main` in this process (`cli.run_in_process`); those
# refused after a restore or a training step run the command as a subprocess.


def test_unknown_experiment_lists_registered(tmp_path):
  cli.assert_user_error(cli.run_in_process("--exp=nope", f"--workdir={tmp_path}"),
                        "unknown experiment 'nope'", "demo", "tiny")


def test_unknown_set_key_names_nearest(tmp_path):
  cli.assert_user_error(cli.run_in_process("--exp=tiny", "--set", "train.step=3",
                                           f"--workdir={tmp_path}"),
                        "unknown config key 'train.step'", "train.steps")


def test_wrong_type_names_field_and_type(tmp_path):
  cli.assert_user_error(cli.run_in_process("--exp=tiny", "--set", "model.d_model=wide",
                                f"--workdir={tmp_path}"), "model.d_model", "expected int")


def test_data_path_matching_nothing(tmp_path):
  cli.assert_user_error(
      cli.run_in_process("--exp=tiny", "--set", f"data.path={tmp_path}/none/*.txt",
                         f"--workdir={tmp_path}/w"),
      f"{tmp_path}/none/*.txt", "matches no file")


def test_empty_corpus(tmp_path):
  (tmp_path / "empty.txt").write_text("")
  cli.assert_user_error(
      cli.run_in_process("--exp=tiny", "--set", f"data.path={tmp_path}/empty.txt",
                         f"--workdir={tmp_path}/w"),
      "empty")


def test_binary_and_non_utf8_files(tmp_path):
  (tmp_path / "model.bin").write_bytes(bytes(range(256)) * 10)
  cli.assert_user_error(
      cli.run_in_process("--exp=tiny", "--set", f"data.path={tmp_path}/model.bin",
                         f"--workdir={tmp_path}/w"),
      "model.bin", "binary")
  (tmp_path / "old.txt").write_bytes("naïve text ".encode("latin-1") * 50)
  cli.assert_user_error(
      cli.run_in_process("--exp=tiny", "--set", f"data.path={tmp_path}/old.txt",
                         f"--workdir={tmp_path}/w2"),
      "old.txt", "not UTF-8")


def test_prompt_longer_than_max_len(trained):
  cli.assert_user_error(cli.run_in_process(f"--workdir={trained}", "--mode=sample",
                                           "--prompt=" + "x" * 500),
                        "501 tokens", "model.max_len is 128")


def test_workdir_not_writable(tmp_path):
  blocker = tmp_path / "a-file"
  blocker.write_text("not a directory")
  cli.assert_user_error(cli.run_in_process("--exp=tiny", f"--workdir={blocker}/run"),
                        f"workdir '{blocker}/run' is not writable")


def test_config_change_is_refused_with_a_diff(trained, tmp_path):
  workdir = tmp_path / "copy"
  shutil.copytree(trained, workdir)
  result = cli.run_in_process(*TINY, "--set", "model.d_model=32", "--set",
                              "optimizer.learning_rate=0.01", f"--workdir={workdir}")
  message = cli.assert_user_error(result, "different configuration", "model.d_model: 64 -> 32",
                                  "optimizer.learning_rate: 0.003 -> 0.01",
                                  "run.allow_config_change=true")
  assert "train.steps" not in message
  allowed = cli.run(*TINY, "--set", "optimizer.learning_rate=0.01", "--set",
                    "run.allow_config_change=true", "--set", "train.steps=22",
                    f"--workdir={workdir}")
  assert allowed.returncode == 0, allowed.stderr
  assert "resumed from step 20" in allowed.stdout


def test_sampling_may_change_sampler_fields_only(trained):
  cli.assert_user_error(cli.run_in_process(f"--workdir={trained}", "--mode=sample", "--set",
                                           "model.num_layers=3"),
                        "model.num_layers: 2 -> 3", "sampler.*")


def test_sample_without_a_trained_run(tmp_path):
  cli.assert_user_error(cli.run_in_process(f"--workdir={tmp_path}", "--mode=sample"),
                        "no trained run")


def _corrupt(workdir, step):
  for f in (workdir / "checkpoints" / str(step) / "state").rglob("*"):
    if f.is_file() and "ocdbt" in str(f):
      f.write_bytes(b"garbage")


def test_corrupt_checkpoint_falls_back_to_previous(trained, tmp_path):
  workdir = tmp_path / "copy"
  shutil.copytree(trained, workdir)
  _corrupt(workdir, 20)
  result = cli.run(f"--workdir={workdir}", "--mode=eval")
  assert result.returncode == 0, result.stderr
  assert "checkpoint at step 20 is corrupt or partial" in result.stdout
  assert "falling back to step 10" in result.stdout
  assert cli.last_json(result.stdout)["step"] == 10
  assert list((workdir / "checkpoints_unreadable").iterdir())  # set aside, not deleted
  resumed = cli.run(*TINY, f"--workdir={workdir}")
  assert resumed.returncode == 0, resumed.stderr
  assert "resumed from step 10" in resumed.stdout


def test_partial_checkpoint_falls_back(trained, tmp_path):
  workdir = tmp_path / "copy"
  shutil.copytree(trained, workdir)
  shutil.rmtree(workdir / "checkpoints" / "20" / "state")
  result = cli.run(*TINY, f"--workdir={workdir}")
  assert result.returncode == 0, result.stderr
  assert "falling back to step 10" in result.stdout and "resumed from step 10" in result.stdout


def test_nan_loss_stops_and_keeps_last_good_checkpoint(trained, tmp_path):
  workdir = tmp_path / "copy"
  shutil.copytree(trained, workdir)
  before = sorted(p.name for p in (workdir / "checkpoints").iterdir())
  result = cli.run(*TINY, "--set", "train.steps=40", "--set", "optimizer.learning_rate=1e30",
                   "--set", "optimizer.clip_norm=1e30", "--set", "run.allow_config_change=true",
                   f"--workdir={workdir}")
  cli.assert_user_error(result, "loss became", "last good checkpoint (step 20) is intact")
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == before


def test_checkpoint_from_another_model_shape_is_refused_untouched(trained, tmp_path):
  workdir = tmp_path / "copy"
  shutil.copytree(trained, workdir)
  result = cli.run(*TINY, "--set", "model.mlp_dim=96", "--set", "run.allow_config_change=true",
                   f"--workdir={workdir}")
  cli.assert_user_error(result, "checkpoint at step 20", "another shape", "mlp/down/kernel",
                        "saved (128, 64), model expects (96, 64)")
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["10", "20"]
  assert not (workdir / "checkpoints_unreadable").exists()


GREEDY = ("--mode=sample", "--prompt=ROMEO:", "--set", "sampler.max_new_tokens=20", "--set",
          "sampler.temperature=0")


def _text(stdout: str) -> str:
  """The sampled text between the `---` rules of a sample run's output."""
  return stdout[stdout.index("---"):stdout.rindex("---")].split("\n", 1)[1]


@pytest.fixture(scope="module")
def greedy_ar_text(trained):
  """The trained model's greedy AR continuation of "ROMEO:", printed by the command line."""
  result = cli.run(f"--workdir={trained}", *GREEDY)
  assert result.returncode == 0, result.stderr
  return _text(result.stdout)


@pytest.mark.parametrize("kind, setting", [("speculative", "num_draft_tokens=3"),
                                           ("spectr", "num_draft_tokens=2"),
                                           ("tree", "branching=2,1"),
                                           ("dynamic_tree", "node_budget=4")])
def test_drafted_sampling_from_the_cli_matches_greedy_ar(trained, greedy_ar_text, kind, setting):
  drafted = cli.run(f"--workdir={trained}", *GREEDY, "--set", f"sampler.{setting}", "--set",
                    f"sampler.kind={kind}", "--set", f"sampler.draft_workdir={trained}")
  assert drafted.returncode == 0, drafted.stderr
  stats = cli.last_json(drafted.stdout)
  assert stats["sampler"] == kind
  if kind != "dynamic_tree":  # a budgeted tree need not hold the whole greedy path
    assert stats["acceptance"] == 1.0  # the draft is the target
  assert stats["draft_calls"] > 1 and stats["target_calls"] < stats["tokens"]
  assert _text(drafted.stdout) == greedy_ar_text


def test_jacobi_from_the_cli_matches_greedy_ar(trained, greedy_ar_text):
  result = cli.run(f"--workdir={trained}", *GREEDY, "--set", "sampler.kind=jacobi", "--set",
                   "sampler.block_size=4")
  assert result.returncode == 0, result.stderr
  stats = cli.last_json(result.stdout)
  assert stats["sampler"] == "jacobi" and stats["iterations_per_block"] > 0
  assert _text(result.stdout) == greedy_ar_text
  cli.assert_user_error(cli.run_in_process(f"--workdir={trained}", "--mode=sample", "--set",
                                           "sampler.kind=jacobi", "--set",
                                           "sampler.temperature=0.5"),
                        "jacobi decodes greedily")


def test_drafted_sampling_without_a_draft(trained):
  cli.assert_user_error(cli.run_in_process(f"--workdir={trained}", "--mode=sample", "--set",
                                           "sampler.kind=speculative"),
                        "sampler.kind=speculative needs a trained draft model",
                        "sampler.draft_workdir")
  cli.assert_user_error(cli.run_in_process(f"--workdir={trained}", "--mode=sample", "--set",
                                           "sampler.num_draft_tokens=0", "--set",
                                           "sampler.kind=speculative"),
                        "num_draft_tokens (gamma) must be >= 1")

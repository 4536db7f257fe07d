r"""The paxlike command line: train, evaluate or sample an experiment in a workdir.

  python -m paxlike.main                                   # the main job (demo): train + sample
  python -m paxlike.main --exp=tiny --workdir=/tmp/t --set train.steps=50
  python -m paxlike.main --workdir=/tmp/t --mode=sample --prompt="ROMEO:" --set sampler.temperature=0
  python -m paxlike.main --workdir=/tmp/t --mode=eval
  python -m paxlike.main --workdir=/tmp/hf --mode=sample --set model.init_from=LLAMA_DIR
  python -m paxlike.main --workdir=/tmp/t --mode=export --export_dir=/tmp/t-hf

All logic lives in importable modules; this file only parses flags and reports errors.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from absl import app, flags

from paxlike import config as config_lib
from paxlike import registry
from paxlike.errors import UserError
from paxlike.run import Run

FLAGS = flags.FLAGS
flags.DEFINE_string("exp", "demo", "Registered experiment name.")
flags.DEFINE_string("workdir", None, "Run directory (config, metrics, checkpoints). "
                    "Default: runs/<exp>.")
flags.DEFINE_enum("mode", "train", ["train", "eval", "sample", "export"], "What to do.")
flags.DEFINE_multi_string("set", [], "Config override section.field=value (repeatable).")
flags.DEFINE_multi_string("prompt", [], "Prompt text for --mode=sample (repeat for a batch). "
                          "Default: sampler.prompt.")
flags.DEFINE_string("export_dir", None, "--mode=export: write the trained model here as a "
                    "Hugging Face Llama directory (config.json + model.safetensors).")
flags.DEFINE_list("experiments", list(registry.DEFAULT_MODULES),
                  "Python modules that register experiments.")
flags.DEFINE_string("coordinator_address", None, "Multi-process: host:port of process 0.")
flags.DEFINE_integer("num_processes", None, "Multi-process: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-process: this process's index.")


def _workdir(exp_name: str) -> Path:
  return Path(FLAGS.workdir) if FLAGS.workdir else Path("runs") / exp_name


def _ensure_writable(workdir: Path) -> None:
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / ".write-test"
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    raise UserError(f"workdir {str(workdir)!r} is not writable ({e.strerror}); "
                    "pass a writable --workdir") from None


def resolve_experiment(mode: str, exp_name: str, workdir: Path,
                       overrides: list[str]) -> config_lib.Experiment:
  """The experiment to run, checked against what the workdir was trained with."""
  trained = Run(workdir)
  stored = trained.stored_config()
  if mode == "train":
    exp = _fresh_experiment(exp_name, overrides)
    trained.check_unchanged(exp, exp.run.allow_config_change)
    return exp
  if stored is None and mode in ("eval", "sample") and any(
      o.strip().startswith("model.init_from=") for o in overrides):
    return _fresh_experiment(exp_name, overrides)  # the imported weights, untrained here
  if stored is None:
    raise UserError(f"workdir {str(workdir)!r} has no trained run (no config.json); "
                    f"train first with --mode=train --workdir={workdir}")
  exp = config_lib.validate(config_lib.apply_overrides(stored, overrides))
  changes = config_lib.diff(
      stored, exp, [k for k in config_lib.flatten(exp)
                    if k.split(".")[0] not in config_lib.SAMPLE_MUTABLE])
  if changes and not exp.run.allow_config_change:
    raise UserError(
        f"--mode={mode} may only change {', '.join(s + '.*' for s in config_lib.SAMPLE_MUTABLE)}; "
        "these would change the trained model:\n" + "\n".join(changes))
  return exp


def _fresh_experiment(exp_name: str, overrides: list[str]) -> config_lib.Experiment:
  """The registered experiment with overrides; with model.init_from its model shape fields come
  from that Hugging Face directory's config.json (`interchange.resolve_model`)."""
  exp = config_lib.apply_overrides(registry.get(exp_name), overrides)
  if exp.model.init_from:
    from paxlike import interchange
    explicit = [o.split("=", 1)[0].strip().removeprefix("model.") for o in overrides]
    exp = dataclasses.replace(exp, model=interchange.resolve_model(exp.model, explicit))
  return config_lib.validate(exp)


def run(mode: str, exp_name: str, overrides: list[str], prompts: list[str]) -> int:
  """Runs one mode; returns the process exit code."""
  registry.load_modules(tuple(FLAGS.experiments))
  if FLAGS.workdir is None or mode == "train":
    registry.get(exp_name)  # an unknown name is reported before anything else
  workdir = _workdir(exp_name)
  exp = resolve_experiment(mode, exp_name, workdir, overrides)
  if mode == "train":
    _ensure_writable(workdir)

  # Imported only now so that config errors and --help answer without loading jax.
  from parallelism import distributed
  from paxlike import workflows
  from paxlike.checkpointing import quiet_orbax_logging

  quiet_orbax_logging()
  try:
    distributed.maybe_initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  except ValueError as e:
    raise UserError(str(e)) from None
  if mode == "train":
    Run(workdir).write_config(exp)
    return workflows.train(exp, workdir)
  if mode == "eval":
    return workflows.evaluate(exp, workdir)
  if mode == "export":
    if not FLAGS.export_dir:
      raise UserError("--mode=export needs --export_dir=DIR (where config.json and "
                      "model.safetensors are written)")
    return workflows.export(exp, workdir, Path(FLAGS.export_dir))
  return workflows.sample(exp, workdir, prompts or [exp.sampler.prompt])


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}; overrides go through --set a.b=value",
          file=sys.stderr)
    return 2
  try:
    return run(FLAGS.mode, FLAGS.exp, FLAGS.set, FLAGS.prompt)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


def cli() -> None:
  app.run(main)


if __name__ == "__main__":
  cli()

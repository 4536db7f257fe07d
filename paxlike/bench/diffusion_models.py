"""The models of the `diffusion` suite (`diffusion_suite`): their experiments, and training them
into the bench cache unless cached (`models`). Only the models the chosen samplers need are
trained; each is cached per step count."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from models.config import DiffusionConfig, FinalityConfig, ModelConfig
from paxlike import config as config_lib
from paxlike import diffusion_teacher, tasks
from paxlike.bench import harness
from paxlike.config import (CheckpointConfig, DataConfig, EvalConfig, Experiment,
                            OptimizerConfig, RunConfig, ScheduleConfig, TrainConfig)
from paxlike.errors import UserError

BLOCK = 8  # block length of block decoding and of the block-causal model; divides LINE_WIDTH
SEQ_LEN = 2 * tasks.LINE_WIDTH  # training windows of 2 whole lines, aligned with line starts
STUDENT_LINES = 100_000  # the most teacher-answered lines the student trains on
SAMPLER_MODELS = ("mdlm", "mdlm_block", "asarm", "ar", "learn2pd", "mdlm_student",
                  "mdlm_certain", "ar_draft")  # the `models` that `samplers` takes, in order
ONE_CALL_MIN_T = 0.9  # the student's second stage: responses >= 90% masked (one-call states)
ONE_CALL_ROWS = 0.5  # ... on half of each batch's rows; the others keep t ~ (1e-3, 1]
ONE_CALL_CYCLES = 2  # the second stage's runs of steps // 2, each from the last (warm restarts)
AR_STEPS = 3000  # the causal judge and EDLM energy; a 2-layer one solves sort by 700 steps
CERTAINTY_WEIGHT = 1.0  # the dParallel student's certainty-forcing weight (not tuned)


def experiment(name: str, kind: str, corpus: Path, steps: int, init_from: Path | None = None,
               learning_rate: float = 3e-3, finality: FinalityConfig = FinalityConfig(),
               seq_len: int = SEQ_LEN, **diffusion: Any) -> Experiment:
  """A ~0.7M-parameter model of the task corpus, trained on windows of `seq_len` (two corpus
  lines). The diffusion-style kinds are conditional (`model.diffusion.response_after` '='):
  trained to fill answers given their prompts. `init_from` fine-tunes from another run of the
  same shape (every parameter copied). `diffusion`: further `model.diffusion` fields (e.g.
  block_size); `finality`: the `model.finality` section."""
  conditional = {} if kind == "llama" else {"response_after": "="}
  return Experiment(
      name=name,
      model=ModelConfig(kind=kind, num_layers=4, d_model=128, num_heads=4, num_kv_heads=4,
                        mlp_dim=256, max_len=seq_len,
                        diffusion=DiffusionConfig(**conditional, **diffusion), finality=finality),
      data=DataConfig(path=str(corpus), seq_len=seq_len, eval_fraction=0.02),
      optimizer=OptimizerConfig(learning_rate=learning_rate, weight_decay=0.0),
      schedule=ScheduleConfig(kind="cosine", warmup_steps=30),
      checkpoint=CheckpointConfig(every_steps=steps, keep=1),
      train=TrainConfig(steps=steps, batch_size=32,
                        init_from=str(init_from) if init_from else ""),
      eval=EvalConfig(every_steps=0, batches=2),
      run=RunConfig(log_every=250, sample_after_train=False),
  )


def models(root: Path, corpus: Path, steps: int, model_overrides: tuple[str, ...] = (),
           wanted: tuple[str, ...] | set[str] = SAMPLER_MODELS,
           cycles: int = ONE_CALL_CYCLES, seq_len: int = SEQ_LEN) -> dict[str, tuple[Any, Any]]:
  """The suite's (model, params) by name, those `wanted` (and the MDLM the others start from),
  trained in `root`/<steps>_steps unless cached there (a
  new step count trains afresh instead of resuming under another schedule). The bidirectional
  MDLM trains for `steps`; the block-causal MDLM and the AS-ARM are fine-tuned from it (same
  shapes: block diffusion and AS-ARMs start from a masked-diffusion checkpoint in their papers
  too) for steps // 4 and steps // 8 (its two-stream passes cost twice as much); the AR judge
  trains for steps // 2 (at most AR_STEPS: it learns the task lines far sooner), and so does its
  one-layer separate draft (`draft_experiment`), the Learn2PD head for steps // 16. The student is
  fine-tuned from the MDLM for steps // 2 at a third of its learning rate on the first 4 * student
  steps * batch lines of the corpus (at most STUDENT_LINES), each answered by the MDLM's greedy
  top-1 unmasking given its prompt alone
  (`diffusion_teacher`; written once to `root`/<steps>_steps/self_answers.txt), then on the same
  answers with t drawn from (ONE_CALL_MIN_T, 1] on half of each batch's rows
  (`model.diffusion.min_t`, `model.diffusion.min_t_rows`): the nearly fully masked responses that
  few-call decoding starts from, which plain MDLM training visits rarely (a 4-token answer is all
  masked in 20% of rows at t ~ U(0, 1)), while the other rows keep the partly masked states of
  the later calls. That second stage runs `cycles` (ONE_CALL_CYCLES) times for steps // 2, each
  run from the last (warm restarts of the cosine schedule; one call keeps improving with steps).
  The dParallel student (`mdlm_certain`) shares the student's first stage and runs the same
  second stage with dParallel's certainty forcing added (`model.diffusion.certainty_weight` =
  CERTAINTY_WEIGHT), so the two differ by that term alone.
  `model_overrides`: `--set`-style model.* fields of every model (tests: a smaller one); the
  cache does not tell them apart, so give other overrides another `root`. `seq_len`: the
  training windows (two lines of the corpus's width)."""
  root = root / f"{steps}_steps"
  mdlm_dir = root / "tasks_mdlm"
  part = lambda n: max(1, steps // n)
  if bad := [o for o in model_overrides if not o.startswith("model.")]:
    raise UserError(f"model_overrides set model.* fields only, got {', '.join(bad)}")
  shaped = lambda exp: config_lib.apply_overrides(exp, model_overrides)  # every model alike
  specs = {
      "mdlm": experiment("tasks_mdlm", "mdlm", corpus, steps, seq_len=seq_len),
      "mdlm_block": experiment("tasks_mdlm_block", "mdlm", corpus, part(4), mdlm_dir,
                               block_size=BLOCK, seq_len=seq_len),
      "asarm": experiment("tasks_asarm", "asarm", corpus, part(8), mdlm_dir, seq_len=seq_len),
      "ar": experiment("tasks_ar", "llama", corpus, min(part(2), AR_STEPS), seq_len=seq_len),
      "learn2pd": finality_experiment(corpus, part(16), mdlm_dir, seq_len=seq_len),
      "ar_draft": draft_experiment(corpus, min(part(2), AR_STEPS), seq_len=seq_len),
  }
  pairs = {name: trained(shaped(exp), root / exp.name) for name, exp in specs.items()
           if name in wanted or name == "mdlm"}
  if not {"mdlm_student", "mdlm_certain"} & set(wanted):
    return pairs
  answers_path = root / "self_answers.txt"
  student = shaped(experiment("tasks_mdlm_student", "mdlm", answers_path, part(2), mdlm_dir,
                              learning_rate=1e-3,  # a third of the MDLM's: a fine-tune
                              seq_len=seq_len))
  if not answers_path.exists():
    lines = min(STUDENT_LINES, 4 * student.train.steps * student.train.batch_size)
    print(f"writing the MDLM's own answers to {lines} training lines", flush=True)
    diffusion_teacher.write(mdlm_dir, answers_path, lines)
  pairs["mdlm_student_stage1"] = trained(student, root / student.name)
  for name, prefix, certainty in (("mdlm_student", "tasks_mdlm_student_mixed", 0.0),
                                  ("mdlm_certain", "tasks_mdlm_certain", CERTAINTY_WEIGHT)):
    if name not in wanted:
      continue
    previous = root / student.name
    for cycle in range(1, cycles + 1):
      mixed = shaped(experiment(f"{prefix}{cycle if cycle > 1 else ''}", "mdlm", answers_path,
                                part(2), previous, learning_rate=1e-3, min_t=ONE_CALL_MIN_T,
                                min_t_rows=ONE_CALL_ROWS, certainty_weight=certainty,
                                seq_len=seq_len))
      previous = root / mixed.name
      pairs[name] = trained(mixed, previous)
  return pairs


def draft_experiment(corpus: Path, steps: int, seq_len: int = SEQ_LEN) -> Experiment:
  """The separate draft of the AR judge for speculative decoding: a causal model of the task
  corpus with one layer of width 64 (~0.05M parameters), trained like the judge."""
  exp = experiment("tasks_ar_draft", "llama", corpus, steps, seq_len=seq_len)
  return dataclasses.replace(exp, model=dataclasses.replace(
      exp.model, num_layers=1, d_model=64, num_heads=2, num_kv_heads=2, mlp_dim=128))


def trained(exp: Experiment, workdir: Path) -> tuple[Any, Any]:
  """(model, params) of `exp`, trained in `workdir` first unless its last step is saved there."""
  model, params, _ = harness.trained(exp, workdir).restore()
  return model, params


def finality_experiment(corpus: Path, steps: int, denoiser_workdir: Path,
                        seq_len: int = SEQ_LEN) -> Experiment:
  """The Learn2PD head on the frozen denoiser trained in `denoiser_workdir` (same shape)."""
  exp = experiment("tasks_learn2pd", "learn2pd", corpus, steps, denoiser_workdir,
                   finality=FinalityConfig(dim=64, steps=8), seq_len=seq_len)
  return dataclasses.replace(exp, train=dataclasses.replace(exp.train, trainable="^filter/"))



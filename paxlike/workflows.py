"""What each CLI mode does: train (then sample and summarise), evaluate, sample.

Each returns a process exit code; the last line printed by eval and sample is one JSON object.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax

from paxlike import generate
from paxlike.config import Experiment
from paxlike.train import Trainer


def _print(text: str) -> None:
  """Prints on process 0 only (every process runs the same program)."""
  if jax.process_index() == 0:
    print(text, flush=True)


def _show_samples(trainer: Trainer, params, prompts: list[str]) -> dict:
  texts, stats = generate.generate(trainer.model, params, prompts, trainer.exp.sampler)
  for prompt, text in zip(prompts, texts):
    _print(f"--- sample ({trainer.exp.sampler.kind}, temperature "
           f"{trainer.exp.sampler.temperature}) ---\n{prompt}{text}\n---")
  return stats


def train(exp: Experiment, workdir: Path) -> int:
  trainer = Trainer(exp, workdir, log=_print)
  result = trainer.run()
  if result.interrupted:
    return 0
  summary = {"steps": result.step, "eval_loss": result.eval_loss, "eval_bpb": result.eval_bpb,
             "train_tokens_per_s": round(result.tokens_per_s, 1)}
  if exp.run.sample_after_train and jax.process_count() == 1:
    stats = _show_samples(trainer, result.params, [exp.sampler.prompt])
    summary["sample_tokens_per_s"] = stats["tokens_per_s"]
  bpb = f"{result.eval_bpb:.3f}" if result.eval_bpb is not None else "n/a"
  _print(f"done: {result.step} steps, held-out {bpb} bits/byte, "
         f"{result.tokens_per_s:,.0f} train tokens/s; checkpoints in {workdir / 'checkpoints'}")
  _print(json.dumps(summary))
  return 0


def evaluate(exp: Experiment, workdir: Path) -> int:
  trainer = Trainer(exp, workdir, log=_print)
  params, step = trainer.restore_params()
  loss, bpb = trainer.evaluate(params)
  _print(json.dumps({"step": step, "eval_loss": loss, "eval_bpb": bpb}))
  return 0


def sample(exp: Experiment, workdir: Path, prompts: list[str]) -> int:
  trainer = Trainer(exp, workdir, log=_print)
  params, step = trainer.restore_params()
  stats = _show_samples(trainer, params, prompts)
  _print(json.dumps({"step": step, **stats}))
  return 0

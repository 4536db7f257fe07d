"""What each CLI mode does: train (then sample and summarise), evaluate, sample, export.

Each returns a process exit code; the last line printed by eval and sample is one JSON object.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax

from paxlike import config as config_lib
from paxlike import generate, interchange, registry
from paxlike.config import Experiment
from paxlike.errors import UserError
from paxlike.run import Run
from paxlike.train import Trainer, TrainResult

COMPANION_DRAFT = "draft"  # WORKDIR/draft holds the draft trained by `sampler.draft_experiment`
COMPANION_DIFFUSION = "diffusion"  # WORKDIR/diffusion: `sampler.diffusion_experiment`'s model


def _print(text: str) -> None:
  """Prints on process 0 only (every process runs the same program)."""
  if jax.process_index() == 0:
    print(text, flush=True)


def _load_draft(exp: Experiment, workdir: Path) -> tuple[Any, Any]:
  """(draft model, its params) for the drafted sampler kinds, else (None, None)."""
  if not exp.sampler.spec.second_model:
    return None, None
  path = Path(exp.sampler.draft_workdir) if exp.sampler.draft_workdir else workdir / COMPANION_DRAFT
  drafter = Run(path, log=_print)
  if drafter.stored_config() is None:
    raise UserError(f"sampler.kind={exp.sampler.kind} needs a trained draft model: "
                    f"{str(path)!r} has none; pass --set sampler.draft_workdir=DIR")
  model, params, _ = drafter.restore(exp.mesh)
  return model, params


def _train_companion_draft(exp: Experiment, workdir: Path) -> TrainResult:
  """Trains `sampler.draft_experiment` in WORKDIR/draft by distillation from this run's model."""
  draft_exp = registry.get(exp.sampler.draft_experiment)
  draft_exp = dataclasses.replace(draft_exp, mesh=exp.mesh, train=dataclasses.replace(
      draft_exp.train, teacher_workdir=str(workdir)))
  config_lib.validate(draft_exp)
  draft_dir = workdir / COMPANION_DRAFT
  draft_dir.mkdir(exist_ok=True)
  draft_run = Run(draft_dir)
  draft_run.check_unchanged(draft_exp, exp.run.allow_config_change, companion="companion draft")
  draft_run.write_config(draft_exp)
  _print(f"training the draft model ({draft_exp.name}) by distillation from {exp.name}")
  return Trainer(draft_exp, draft_dir, log=_print).run()


def _train_companion_diffusion(exp: Experiment, workdir: Path) -> tuple[Trainer, TrainResult]:
  """Trains `sampler.diffusion_experiment` in WORKDIR/diffusion (a restart resumes it)."""
  diffusion_exp = dataclasses.replace(registry.get(exp.sampler.diffusion_experiment), mesh=exp.mesh)
  config_lib.validate(diffusion_exp)
  directory = workdir / COMPANION_DIFFUSION
  directory.mkdir(exist_ok=True)
  diffusion_run = Run(directory)
  diffusion_run.check_unchanged(diffusion_exp, exp.run.allow_config_change,
                                companion="companion diffusion model")
  diffusion_run.write_config(diffusion_exp)
  _print(f"training the masked-diffusion model ({diffusion_exp.name})")
  trainer = Trainer(diffusion_exp, directory, log=_print)
  return trainer, trainer.run()


# The demo's parallel decodings of the companion diffusion model: (label, sampler overrides).
DIFFUSION_ROWS = (
    ("unmask_threshold", dict(kind="unmask", rule="threshold", threshold=0.9,
                              temperature=0.0)),
    ("ancestral_16_steps", dict(kind="mdlm", steps=16, temperature=0.8)),
)


def _diffusion_rows(trainer: Trainer, params, prompt: str) -> dict:
  """Parallel decoding of the diffusion model on `prompt`: text, tokens, calls, speed."""
  summary, lines = {}, []
  for label, overrides in DIFFUSION_ROWS:
    cfg = dataclasses.replace(trainer.exp.sampler, prompt=prompt, **overrides)
    texts, stats = generate.generate(trainer.model, params, [prompt], cfg)
    _print(f"--- sample (diffusion {label}, temperature {cfg.temperature}) ---\n"
           f"{prompt}{texts[0]}\n---")
    per_token = stats["model_calls"] / max(stats["tokens"], 1)
    lines.append(f"{label:<20} {stats['tokens']:>6} {per_token:>17.3f} "
                 f"{stats['tokens_per_s']:>9,.0f}")
    summary[f"diffusion_{label}"] = {"tokens": stats["tokens"], "tokens_per_s":
                                     stats["tokens_per_s"],
                                     "model_calls_per_token": round(per_token, 4)}
  _print(f"{'diffusion sampler':<20} {'tokens':>6} {'model calls/token':>17} {'tokens/s':>9}")
  for line in lines:
    _print(line)
  return summary


def _show_samples(model, params, prompts: list[str], cfg: config_lib.SamplerConfig, draft=None,
                  draft_params=None) -> tuple[list[str], dict]:
  texts, stats = generate.generate(model, params, prompts, cfg, draft, draft_params)
  for i, text in enumerate(texts):  # n texts per prompt with sampler.selection=none
    prompt = prompts[i * len(prompts) // len(texts)]
    _print(f"--- sample ({cfg.kind}, temperature {cfg.temperature}) ---\n{prompt}{text}\n---")
  return texts, stats


def _side_by_side(trainer: Trainer, params, draft, draft_params) -> dict:
  """AR, the configured drafted sampler and prompt lookup (no draft: copies from the row's own
  text) on the same prompt, timed interleaved (medians of 9 runs each): speed, calls, equal text."""
  cfg = trainer.exp.sampler
  kinds = ["ar", cfg.kind, "prompt_lookup"]
  results = generate.side_by_side(
      trainer.model, params, [cfg.prompt], [dataclasses.replace(cfg, kind=kind) for kind in kinds],
      draft, draft_params)
  ar_texts = results[0][0]
  _print(f"--- sample ({cfg.kind}, temperature {cfg.temperature}) ---\n{cfg.prompt}"
         f"{results[1][0][0]}\n---")
  _print(f"{'sampler':<14} {'tokens/s':>9} {'speedup':>8} {'tokens/target call':>19} "
         f"{'acceptance':>10}  same text as AR")
  summary = {"ar_tokens_per_s": results[0][1]["tokens_per_s"]}
  for kind, (texts, stats) in zip(kinds, results):
    if kind == "ar":
      _print(f"{'ar':<14} {stats['tokens_per_s']:>9,.0f} {1.0:>8.2f} {1.0:>19.2f} {'-':>10}  -")
      continue
    same = texts == ar_texts
    _print(f"{kind:<14} {stats['tokens_per_s']:>9,.0f} {stats['speedup_vs_first']:>8.2f} "
           f"{stats['tokens_per_target_call']:>19.2f} {stats['acceptance']:>10.2f}  {same}")
    prefix = "" if kind == cfg.kind else f"{kind}_"
    summary |= {f"{kind}_tokens_per_s": stats["tokens_per_s"],
                f"{prefix}speedup": stats["speedup_vs_first"],
                f"{prefix}acceptance": stats["acceptance"], f"{prefix}same_text_as_ar": same}
  return summary


def train(exp: Experiment, workdir: Path) -> int:
  trainer = Trainer(exp, workdir, log=_print)
  result = trainer.run()
  if result.interrupted:
    return 0
  summary = {"steps": result.step, "eval_loss": result.eval_loss, "eval_bpb": result.eval_bpb,
             "train_tokens_per_s": round(result.tokens_per_s, 1)}
  draft = draft_params = None
  if exp.sampler.draft_experiment:
    draft_result = _train_companion_draft(exp, workdir)
    if draft_result.interrupted:
      return 0
    summary["draft_eval_bpb"] = draft_result.eval_bpb
    draft, draft_params = _load_draft(exp, workdir)
  diffusion = None
  if exp.sampler.diffusion_experiment:
    diffusion, diffusion_result = _train_companion_diffusion(exp, workdir)
    if diffusion_result.interrupted:
      return 0
    summary["diffusion_eval_bpb"] = diffusion_result.eval_bpb
  if exp.run.sample_after_train and jax.process_count() == 1:
    if draft is not None:
      summary.update(_side_by_side(trainer, result.params, draft, draft_params))
    else:
      _, stats = _show_samples(trainer.model, result.params, [exp.sampler.prompt], exp.sampler)
      summary["sample_tokens_per_s"] = stats["tokens_per_s"]
    if diffusion is not None:
      summary.update(_diffusion_rows(diffusion, diffusion_result.params, exp.sampler.prompt))
  bpb = f"{result.eval_bpb:.3f}" if result.eval_bpb is not None else "n/a"
  _print(f"done: {result.step} steps, held-out {bpb} bits/byte, "
         f"{result.tokens_per_s:,.0f} train tokens/s; checkpoints in {workdir / 'checkpoints'}")
  _print(json.dumps(summary))
  return 0


def evaluate(exp: Experiment, workdir: Path) -> int:
  trainer = Trainer(exp, workdir, log=_print)
  _, params, step = Run(workdir, exp, log=_print).restore()
  loss, bpb = trainer.evaluate(params)
  _print(json.dumps({"step": step, "eval_loss": loss, "eval_bpb": bpb}))
  return 0


def sample(exp: Experiment, workdir: Path, prompts: list[str]) -> int:
  model, params, step = Run(workdir, exp, log=_print).restore()
  draft, draft_params = _load_draft(exp, workdir)
  _, stats = _show_samples(model, params, prompts, exp.sampler, draft, draft_params)
  _print(json.dumps({"step": step, **stats}))
  return 0


def export(exp: Experiment, workdir: Path, out_dir: Path) -> int:
  """Writes the workdir's latest parameters as a Hugging Face Llama directory (config.json,
  model.safetensors, and the tokenizer files of model.init_from if it has them)."""
  if exp.model.kind != "llama":
    raise UserError(f"--mode=export writes Llama checkpoints; model.kind={exp.model.kind!r} has "
                    "no Hugging Face counterpart")
  _, params, step = Run(workdir, exp, log=_print).restore()
  if jax.process_index() == 0:
    try:
      interchange.save_hf(out_dir, exp.model, params)
    except ValueError as e:
      raise UserError(str(e)) from None
  _print(json.dumps({"step": step, "exported": str(out_dir)}))
  return 0

"""The `diffusion` suite: diffusion-style samplers on the parallel-decoding task suite.

Writes the task corpus (`paxlike.tasks`) and trains (or loads from `--workdir`) the small models
that the chosen samplers need (`--samplers`; all six for every row): a bidirectional MDLM, a
block-causal MDLM (blocks of BLOCK), an any-subset AR model, a causal Llama (the EDLM energy and
the judge of generative perplexity), the Learn2PD finality head on the frozen MDLM
(`train.init_from` its run, `train.trainable` the head) and a student MDLM self-distilled on the
MDLM's own one-token-per-call answers (`paxlike.diffusion_teacher`), then with half of its rows on
nearly fully masked answers, so that it decodes in fewer calls, and dParallel's student: the same
with certainty forcing (`models.diffusion.certainty`; the `certain` rows). `diffusion_models`
trains them. Every sampler then answers the same held-out prompts of every task, each row a canvas
of two corpus lines: a solved example of the task, then the prompt with its answer masked and the
line's known padding. A row per sampler and task (and `all`) reports model calls per generated
token, tokens/s (median of 3 after a compile warm-up), task accuracy beside the task's chance
levels, the AR model's perplexity of the answers, and for block decoding with a cache the fraction
of rows that differ from cache-free decoding (`cache_deviation`) and the cache-free accuracy (exact
for the block-causal model; the `fast_dllm` rows measure Fast-dLLM's approximate prefix and dual
caches on the bidirectional model). The `diffusion_drafted` rows (`diffusion_drafted_rows`) decode
the AR judge exactly, drafted by the MDLM, against plain AR; the `apd` rows run APD's lossy mixture
rule on the same pair, and the `speculative` rows the same judge drafted by a separate one-layer
causal draft, the peer the diffusion drafter is measured against. Rows with "(S slots)" decode by
continuous batching (`samplers.core.refill`): calls of S rows are counted as S / (prompts per task)
of a batch call. `--task_suite long` (`run(suite="long")`) instead runs `long_samplers`, the
MDLM's parallel unmasking rules, on the long-answer tasks (`tasks.LONG_TASKS`: 9-16 answer tokens)
with an MDLM and AR judge of their own, trained on their own corpus under `long/`."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from paxlike import config as config_lib
from paxlike import tasks, tokenizer
from paxlike.bench import diffusion_drafted_rows, harness
from paxlike.bench.diffusion_models import BLOCK, ONE_CALL_CYCLES, SAMPLER_MODELS, models
from paxlike.errors import UserError
from samplers import assd, block_diffusion, edlm, learned_unmask, mdlm, unmask
from samplers.core.logits import SamplingParams

CORPUS_LINES = 200_000  # 4.8 MB; the held-out prompts are other seeds
LONG_CORPUS_LINES = 100_000  # the long suite's corpus (4.8 MB)
TRAIN_STEPS = {"short": 24_000, "long": 12_000}  # the MDLM's default training steps per suite
PROMPT_SEED = 10_000  # the held-out prompts of the rows (the corpus is drawn with seed 0)
SAMPLER_NAMES = ("ancestral", "topk", "threshold", "factor", "greedy_safe", "block",
                 "fast_dllm", "distilled", "certain", "learned", "edlm", "assd",
                 "diffusion_drafted", "apd", "speculative")  # the rows' `sampler` (`samplers`)
GREEDY, T1 = SamplingParams(temperature=0.0), SamplingParams(temperature=1.0)


def canvases(task: tasks.Task, count: int, mask_id: int,
             seed: int = PROMPT_SEED) -> tuple[np.ndarray, list[str]]:
  """[count, 2 * line_width] canvases and their held-out prompts (drawn with `seed`): a solved
  example line of the task (another held-out example, drawn with seed + 10000), then the
  prompt's line with the answer masked. Two whole lines, like the training windows, so a
  bidirectional model sees the context it was trained with."""
  prompts = [p for p, _ in task.examples(count, seed=seed)]
  solved = task.examples(count, seed=seed + 10_000)
  rows = []
  for prompt, example in zip(prompts, solved):
    before, length, after = tasks.canvas_parts(task, prompt)
    rows.append(np.concatenate([tokenizer.encode(tasks.line(*example, task.line_width) + before),
                                np.full([length], mask_id, np.int32), tokenizer.encode(after)]))
  return np.stack(rows).astype(np.int32), prompts


def answers(tokens: np.ndarray, canvas: np.ndarray, mask_id: int) -> list[str]:
  """The generated answer text of each row (the positions that were masked)."""
  return [tokenizer.decode(row[c == mask_id]) for row, c in zip(tokens, canvas)]


def answer_nll(ar_logits, ar_params, tokens: np.ndarray, canvas: np.ndarray, mask_id: int):
  """(summed AR nll of the generated tokens, their count): for generative perplexity.
  `ar_logits`: the AR model's jitted `logits`, made once per run (a fresh `jax.jit` of a bound
  method compiles again on every call)."""
  logits = ar_logits(ar_params, jnp.asarray(tokens))[:, :-1]
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -np.asarray(jnp.take_along_axis(logp, jnp.asarray(tokens)[:, 1:, None], -1)[..., 0])
  generated = canvas[:, 1:] == mask_id
  return float(nll[generated].sum()), int(generated.sum())


@dataclasses.dataclass(frozen=True)
class Sampler:
  """One benchmarked decoder: a row label, its sample function, leading args and config."""

  name: str
  setting: str
  fn: Any
  leading: tuple
  config: Any
  exact: bool = False


class Timed:
  """One sampler compiled once for a canvas shape, then run on any canvas of that shape."""

  def __init__(self, s: Sampler, canvas: np.ndarray):
    self.sampler = s
    args = (*s.leading, jnp.asarray(canvas), jax.random.key(0))
    start = time.perf_counter()
    self.compiled = s.fn.lower(*args, s.config).compile()
    self.compile_s = time.perf_counter() - start

  def __call__(self, canvas: np.ndarray, repeats: int) -> tuple[np.ndarray, dict]:
    """(tokens [B, L], stats) on `canvas`, wall time the median of `repeats` runs."""
    dynamic = (*self.sampler.leading[1::2], jnp.asarray(canvas), jax.random.key(0))
    (times,), (out,) = harness.interleaved_times(
        [lambda: jax.block_until_ready(self.compiled(*dynamic))], repeats)
    stats = {k: float(np.asarray(v)) for k, v in out.stats.items()}
    stats.update(wall_s=sorted(times)[len(times) // 2], compile_s=self.compile_s)
    return np.asarray(out.tokens), stats


def samplers(mdlm_pair, block_pair, asarm_pair, ar_pair, learned_pair, student_pair,
             certain_pair, draft_pair) -> list[Sampler]:
  model, params = mdlm_pair
  pair = (model, params)
  rule = unmask.UnmaskConfig
  out = [
      Sampler("ancestral", "S=4", mdlm.sample, pair, mdlm.AncestralConfig(4, sampling=GREEDY)),
      Sampler("ancestral", "S=8", mdlm.sample, pair, mdlm.AncestralConfig(8, sampling=GREEDY)),
      Sampler("topk", "k=1", unmask.sample, pair, rule(k=1), exact=True),
      Sampler("topk", "k=2", unmask.sample, pair, rule(k=2)),
      Sampler("topk", "k=4", unmask.sample, pair, rule(k=4)),
      Sampler("topk", "k=8 (one call)", unmask.sample, pair, rule(k=8)),
      Sampler("threshold", "tau=0.9", unmask.sample, pair, rule("threshold", threshold=0.9)),
      Sampler("threshold", "tau=0.7", unmask.sample, pair, rule("threshold", threshold=0.7)),
      Sampler("factor", "f=1", unmask.sample, pair, rule("factor", factor=1.0)),
      Sampler("greedy_safe", "1-1/(N+1)", unmask.sample, pair, rule("greedy_safe")),
      Sampler("block", f"block-causal, cached, L={BLOCK}, k=1", block_diffusion.sample,
              block_pair, block_diffusion.BlockConfig(BLOCK, rule(k=1))),
      Sampler("block", f"block-causal, cached, L={BLOCK}, tau=0.9", block_diffusion.sample,
              block_pair, block_diffusion.BlockConfig(BLOCK, rule("threshold"))),
  ]
  # Fast-dLLM's approximate caches of the bidirectional model, against its cache-free decoding:
  # refreshed once per block (the paper's schedule) and every other step of a block; and once per
  # block with the 8 or 16 positions before the block recomputed at every step (fresh window)
  for cache, every in [(c, r) for c in ("prefix", "dual") for r in (0, 2)]:
    for label, unmasking in (("k=1", rule(k=1)), ("tau=0.9", rule("threshold"))):
      out.append(Sampler(
          "fast_dllm", f"{cache} cache, L={BLOCK}, {label}{f', refresh {every}' if every else ''}",
          block_diffusion.sample, pair, block_diffusion.BlockConfig(BLOCK, unmasking, cache,
                                                                    every)))
  for cache, window in [(c, w) for c in ("prefix", "dual") for w in (8, 16)]:
    out.append(Sampler("fast_dllm", f"{cache} cache, L={BLOCK}, k=1, window {window}",
                       block_diffusion.sample, pair,
                       block_diffusion.BlockConfig(BLOCK, rule(k=1), cache, 0, window)))
  # the margins were chosen on other prompts (`--prompt_seed 30000 --examples 256`): there 0.2
  # gives 4.17 tokens per call per row at 0.653, 0.25 4.03 at 0.658, against 90% of one token per
  # step, 0.634; 0.2 leaves continuous batching (slots) room above 4 per call of the batch
  out += student_rows("distilled", student_pair, slots=(0, 4, 16))
  out.append(Sampler("distilled", "margin >= 0.25", unmask.sample, student_pair,
                     rule("threshold", threshold=0.25, confidence="margin")))
  # dParallel's student: the same recipe with certainty forcing, on the distilled rows' rules
  out += student_rows("certain", certain_pair, slots=(0, 4))
  for tau in (0.9, 0.7):
    out.append(Sampler("learned", f"tau={tau}", learned_unmask.sample, learned_pair,
                       learned_unmask.LearnedUnmaskConfig(tau)))
  for steps, count in ((4, 1), (4, 8), (1, 8), (1, 32)):
    out.append(Sampler("edlm", f"S={steps}, K={count}, T=1", edlm.sample, (*pair, *ar_pair),
                       edlm.EDLMConfig(steps, count, sampling=T1)))
  for g, reuse in ((4, False), (4, True), (8, True)):
    for temperature, sampling in (("T=0", GREEDY), ("T=1", T1)):
      out.append(Sampler("assd", f"g={g}{', reuse' if reuse else ''}, {temperature}", assd.sample,
                         asarm_pair, assd.ASSDConfig(g, sampling=sampling, reuse_drafts=reuse),
                         exact=True))
  # the exact diffusion-drafted AR decoder: the AR judge drafted by the MDLM (config: gamma)
  out += [Sampler("diffusion_drafted", f"g={g}", None, (*ar_pair, *pair), (g, 0.0), exact=True)
          for g in diffusion_drafted_rows.GAMMAS]
  # APD, lossy: the same pair, drafts verified against the mixture p_D^R p_AR^(1 - R)
  out += [Sampler("apd", f"R={r}, g=8", None, (*ar_pair, *pair), (8, r)) for r in (0.5, 0.8)]
  # the peer of the diffusion-drafted decoder: the AR judge drafted by a separate causal draft
  out += [Sampler("speculative", f"g={g}", None, (*ar_pair, *draft_pair), (g, 0.0), exact=True)
          for g in diffusion_drafted_rows.GAMMAS]
  return out


def student_rows(name: str, pair, slots: tuple[int, ...]) -> list[Sampler]:
  """A student's rows: one token per call, one call, thresholds 0.9/0.7/0.5, and the margin rule
  >= 0.2 decoded as one batch (0) or by continuous batching of each of `slots`."""
  rule = unmask.UnmaskConfig
  out = [Sampler(name, "k=1", unmask.sample, pair, rule(k=1)),
         Sampler(name, "k=8 (one call)", unmask.sample, pair, rule(k=8))]
  out += [Sampler(name, f"tau={tau}", unmask.sample, pair, rule("threshold", threshold=tau))
          for tau in (0.9, 0.7, 0.5)]
  return out + [Sampler(name, f"margin >= 0.2{f' ({n} slots)' if n else ''}", unmask.sample, pair,
                        rule("threshold", threshold=0.2, confidence="margin", slots=n or None))
                for n in slots]


def long_samplers(mdlm_pair) -> list[Sampler]:
  """The long suite's rows, all on its bidirectional MDLM: one token per call (the accuracy line),
  k per call up to one call per answer, confidence and margin thresholds, and Fast-dLLM's caches
  (whose deviation from cache-free decoding the bench measures)."""
  rule = unmask.UnmaskConfig
  long = tasks.LONG
  out = [Sampler("topk", f"k={k}{' (one call)' if k == long else ''}", unmask.sample, mdlm_pair,
                 rule(k=k), exact=k == 1) for k in (1, 2, 4, 8, long)]
  out += [Sampler("threshold", f"tau={tau}", unmask.sample, mdlm_pair,
                  rule("threshold", threshold=tau)) for tau in (0.9, 0.7, 0.5)]
  out += [Sampler("threshold", f"margin >= {m}", unmask.sample, mdlm_pair,
                  rule("threshold", threshold=m, confidence="margin")) for m in (0.5, 0.2)]
  out.append(Sampler("greedy_safe", "1-1/(N+1)", unmask.sample, mdlm_pair, rule("greedy_safe")))
  out += [Sampler("fast_dllm", f"{cache} cache, L={BLOCK}, tau=0.9", block_diffusion.sample,
                  mdlm_pair, block_diffusion.BlockConfig(BLOCK, rule("threshold"), cache))
          for cache in ("prefix", "dual")]
  return out


def selection(only: tuple[str, ...], suite: str = "short") -> Any:
  """A filter of `Sampler`s: every one when `only` is empty, else those whose name or
  "name/setting" (`--samplers "distilled/margin >= 0.25"`: one row) is in `only`; UserError
  naming the valid choices when one matches nothing."""
  unbound = (long_samplers((None, None)) if suite == "long"  # names and settings: no model
             else samplers(*[(None, None)] * len(SAMPLER_MODELS)))
  names = sorted({s.name for s in unbound}) if suite == "long" else SAMPLER_NAMES
  valid = set(names) | {f"{s.name}/{s.setting}" for s in unbound}
  if set(only) - valid:
    raise UserError(f"unknown sampler(s) {', '.join(sorted(set(only) - valid))} of the {suite} "
                    f"suite; valid: a name ({', '.join(names)}) or name/setting, e.g. topk/k=1")
  return lambda s: not only or s.name in only or f"{s.name}/{s.setting}" in only


def needed_models(keep) -> set[str]:
  """The `SAMPLER_MODELS` that the samplers kept by `keep` (`selection`) decode with, and the AR
  judge: found by building the rows with each model's name in place of its pair."""
  named = samplers(*[(name, name) for name in SAMPLER_MODELS])
  return {"ar"} | {m for s in named if keep(s) for m in s.leading if isinstance(m, str)}


def cache_free(s: Sampler) -> Sampler | None:
  """The same block sampler without its cache (None for other samplers)."""
  if not isinstance(s.config, block_diffusion.BlockConfig):
    return None
  free = dataclasses.replace(s.config, cache="none", refresh_every=0, fresh_window=0)
  return dataclasses.replace(s, config=free)


def run(workdir: str | None, out: str | None, examples: int = 64, train_steps: int | None = None,
        repeats: int = 3, only: tuple[str, ...] = (), prompt_seed: int = PROMPT_SEED,
        model_overrides: tuple[str, ...] = (), student_cycles: int = ONE_CALL_CYCLES,
        suite: str = "short") -> dict[str, Any]:
  """Runs the suite; `examples` prompts per task drawn with `prompt_seed` (another seed: other
  prompts, to choose settings on without touching the reported ones), `train_steps` of the MDLM
  (default TRAIN_STEPS of the suite) and `model_overrides` of every model (`models`; tests: fewer,
  smaller), `student_cycles` runs of the students' second stage; `only` keeps some samplers
  (`selection`; all when empty). `suite` "long" runs `long_samplers` on the long-answer tasks
  (`tasks.LONG_TASKS`), with their own MDLM and AR judge trained on their own corpus."""
  if suite not in TRAIN_STEPS:
    raise UserError(f"unknown diffusion suite {suite!r}; valid: {', '.join(TRAIN_STEPS)}")
  keep = selection(only, suite)  # checked before any training
  root = Path(workdir or Path.home() / ".cache" / "paxlike" / "bench").expanduser() / "diffusion"
  long = suite == "long"
  root, lines = (root / "long", LONG_CORPUS_LINES) if long else (root, CORPUS_LINES)
  corpus = root / f"tasks_{lines}.txt"
  if not corpus.exists():
    tasks.write_corpus(corpus, lines, seed=0, suite=suite)
  steps = train_steps or TRAIN_STEPS[suite]
  suite_tasks = tasks.get(suite=suite)
  width = suite_tasks[0].line_width
  wanted = {"mdlm", "ar"} if long else needed_models(keep)
  trained_models = models(root, corpus, steps, model_overrides, wanted, student_cycles,
                          seq_len=2 * width)
  mdlm_pair, (ar_model, ar_params) = trained_models["mdlm"], trained_models["ar"]
  judge = (jax.jit(ar_model.logits), ar_params)  # for `answer_nll`: compiled once
  mask_id = mdlm_pair[0].mask_id
  batches = {t.name: canvases(t, examples, mask_id, prompt_seed) for t in suite_tasks}
  rows = []
  shape = next(iter(batches.values()))[0]
  chosen = (long_samplers(mdlm_pair) if long else
            samplers(*(trained_models.get(k, (None, None)) for k in SAMPLER_MODELS)))
  for s in [s for s in chosen if keep(s)]:
    if s.name in diffusion_drafted_rows.KINDS:  # a causal model's rows (config: gamma, R)
      drafter = trained_models["ar_draft" if s.name == "speculative" else "mdlm"]
      rows += diffusion_drafted_rows.rows(trained_models["ar"], drafter, suite_tasks, batches,
                                          mask_id, repeats, (s.config[0],), s.config[1],
                                          kind=s.name)
      continue
    timed = Timed(s, shape)
    reference = Timed(cache_free(s), shape) if cache_free(s) else None
    totals = dict(correct=0, count=0, generated=0, calls=0.0, energy=0.0, wall=0.0, nll=0.0,
                  scored=0, deviating=0, free_correct=0, chance=0.0, independent=0.0,
                  row_calls=0.0)
    for task in suite_tasks:
      canvas, prompts = batches[task.name]
      tokens, stats = timed(canvas, repeats)
      correct = sum(task.check(p, a) for p, a in zip(prompts, answers(tokens, canvas, mask_id)))
      nll, scored = answer_nll(*judge, tokens, canvas, mask_id)
      row = _row(s, task.name, correct, len(prompts), stats, nll, scored, task.chance,
                 task.independent_chance)
      if reference is not None:
        free = reference(canvas, 1)[0]
        differs = np.any(free != tokens, axis=1)
        free_correct = sum(task.check(p, a) for p, a in zip(prompts, answers(free, canvas,
                                                                              mask_id)))
        row.update(cache_deviation=round(float(np.mean(differs)), 4),
                   cache_free_accuracy=round(free_correct / len(prompts), 4))
        totals["deviating"] += int(np.sum(differs))
        totals["free_correct"] += free_correct
      rows.append(row)
      totals.update(correct=totals["correct"] + correct, count=totals["count"] + len(prompts),
                    generated=totals["generated"] + stats["generated_tokens"],
                    calls=totals["calls"] + batch_calls(stats, len(prompts)) * len(prompts),
                    energy=totals["energy"] + stats.get("energy_calls", 0) * len(prompts),
                    wall=totals["wall"] + stats["wall_s"], nll=totals["nll"] + nll,
                    scored=totals["scored"] + scored,
                    chance=totals["chance"] + task.chance / len(suite_tasks),
                    independent=(totals["independent"]
                                 + task.independent_chance / len(suite_tasks)))
      if totals["row_calls"] is not None:  # None once a task's sampler does not count them
        totals["row_calls"] = (totals["row_calls"] + stats["row_model_calls"]
                               if "row_model_calls" in stats else None)
    stats = {"generated_tokens": totals["generated"], "model_calls": totals["calls"] / totals["count"],
             "energy_calls": totals["energy"] / totals["count"], "wall_s": totals["wall"],
             "compile_s": 0.0}
    if totals["row_calls"] is not None:
      stats["row_model_calls"] = totals["row_calls"]
    row = _row(s, "all", totals["correct"], totals["count"], stats, totals["nll"],
               totals["scored"], totals["chance"], totals["independent"])
    if reference is not None:
      row.update(cache_deviation=round(totals["deviating"] / totals["count"], 4),
                 cache_free_accuracy=round(totals["free_correct"] / totals["count"], 4))
    rows.append(row)
  summary = [r for r in rows if r["task"] == "all"]
  harness.print_table(summary, ["sampler", "setting", "model_calls_per_token", "tokens_per_call",
                                "tokens_per_call_with_energy", "row_tokens_per_call",
                                "task_accuracy", "chance_accuracy", "independent_chance",
                                "gen_ppl", "tokens_per_s", "exact", "cache_deviation",
                                "cache_free_accuracy", "tokens_per_target_call",
                                "speedup_vs_ar", "greedy_equal_ar"])
  config = {"models": {name: config_lib.to_dict(pair[0].config)
                       for name, pair in trained_models.items()},
            "suite": suite, "train_steps": steps, "student_cycles": student_cycles,
            "examples_per_task": examples, "prompt_seed": prompt_seed,
            "block": BLOCK,
            "line_width": width, "repeats": repeats}
  return harness.write_report(out, "diffusion", config, rows)


def batch_calls(stats: dict, count: int) -> float:
  """Model calls of a batch of all `count` rows: those a sampler made on `rows_per_call` rows
  each (continuous batching: fewer rows per call) scaled to calls on all rows."""
  return stats["model_calls"] * stats.get("rows_per_call", count) / count


def _row(s: Sampler, task: str, correct: int, count: int, stats: dict, nll: float, scored: int,
         chance: float, independent: float) -> dict[str, Any]:
  generated = stats["generated_tokens"]
  calls_per_row = batch_calls(stats, count)
  tokens_per_call = generated / count / calls_per_row
  energy_calls = stats.get("energy_calls", 0)  # EDLM's AR passes over its candidates
  row_calls = stats.get("row_model_calls")  # summed over rows, each until it finished
  return {
      "sampler": s.name, "setting": s.setting, "task": task, "steps": round(calls_per_row, 2),
      "tokens_per_call": round(tokens_per_call, 3),
      "model_calls_per_token": round(1.0 / tokens_per_call, 3),
      "tokens_per_call_with_energy": round(generated / count / (calls_per_row + energy_calls), 3),
      "row_tokens_per_call": round(generated / row_calls, 3) if row_calls else None,
      "task_accuracy": round(correct / count, 4), "chance_accuracy": float(f"{chance:.4g}"),
      "independent_chance": round(independent, 4),
      "gen_ppl": round(float(np.exp(nll / max(scored, 1))), 3),
      "tokens_per_s": round(generated / stats["wall_s"], 1), "wall_s": round(stats["wall_s"], 4),
      "compile_s": round(stats["compile_s"], 3), "exact": s.exact, "cache_deviation": None,
      "cache_free_accuracy": None,
  }

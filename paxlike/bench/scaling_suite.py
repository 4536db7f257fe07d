"""The `scaling` suite: test-time scaling by repeated sampling on the verifiable task suite.

Trains (or loads from `--workdir`) `tasks_lm`, a small byte model of `paxlike.tasks` lines
(copy, rev, sort, add, perm, dyck; corpus written into the cache), then, on held-out prompts of
each task (prompts that do not occur in the training corpus, where the task has any left: the
60k-line corpus holds all 1,680 perm prompts and dyck's single prompt, so those two rows say
`held_out_prompts: false`), samples at temperature 1 and reports for n = 1, 2, 4, ..., 64 samples
per prompt:

- `pass_at_k`: the unbiased pass@k (Chen et al. 2021) from 64 samples per prompt, i.e. the
  accuracy of a perfect verifier choosing among k samples; at k = 1 it is the accuracy of a single
  sample.
- `majority_vote` (self-consistency over the answers), `best_of_n` by the model's own total
  log-likelihood, `mbr` (bag-of-tokens F1 between answers): a selection among the n samples of
  `samplers.repeated.sample`.
- `first_finish` and `reward_pruned` (speculative rejection scored by mean token log-likelihood
  every PRUNE_EVERY tokens, keeping PRUNE_KEEP of the survivors, final pick by total
  log-likelihood as in best-of-n): their own decodes (`samplers.pruned`), with the model calls and
  generated tokens they saved against plain best-of-n at the same n.

One vmapped run draws S = 64 samples per prompt (`repeated.sample`); the majority, best-of-n and
MBR figures at n use its S / n disjoint groups of n samples (each group is exactly an n-sample
run's draw, sample i of a run being its solo run with key fold_in(key, i)), so every accuracy is
a mean over prompts x S / n selections. Their `model_calls` are the batched passes an n-sample run
makes (1 + the longest sample's decode passes, exact from the per-sample stats; +1 scoring pass
for best-of-n), `generated_tokens` the tokens an n-sample run draws for all prompts, and `wall_s`
the S-sample run's (and scoring's) wall time divided by S / n plus the selection's host time.
First-finish and reward-pruned cannot be read off full samples: they decode every prompt
repeated S / n times with n samples each, and report that run's batched passes (scoring passes
included), its generated tokens per S / n copies, and its wall time including compilation.
A line ends with a newline, which is the eos of every decode; the answer is the text before it,
stripped, and is checked by the task's checker. `chance_accuracy` is the task's exact
uniform-random-answer level (`Task.chance`).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from paxlike import coverage, parallel_sampling, registry, tasks, tokenizer
from paxlike.bench import harness
from paxlike.bench.decode_suite import trained
from paxlike.errors import UserError
from samplers import ar, pruned, repeated, selection
from samplers.core.logits import SamplingParams

EXPERIMENT = "tasks_lm"
CORPUS_TASKS = ("copy", "rev", "sort", "add", "perm", "dyck")
CORPUS_LINES = 60_000
CORPUS_SEED = 0
HELD_OUT_SEED = 1  # prompts are drawn with this seed and filtered against the training corpus
NS = (1, 2, 4, 8, 16, 32, 64)
METHODS = ("pass_at_k", "majority_vote", "best_of_n", "mbr", "first_finish", "reward_pruned")
PRUNE_EVERY = 6
PRUNE_KEEP = 0.5
NEWLINE = ord("\n")


def corpus_prompts(path: Path) -> set[str]:
  """The prompts (`tag input=`) of a task corpus file."""
  return {text.split("=", 1)[0] + "=" for text in path.read_text().splitlines() if "=" in text}


def held_out(task: tasks.Task, count: int, seen: set[str], seed: int = HELD_OUT_SEED
             ) -> tuple[list[str], bool]:
  """`count` distinct prompts of `task` not in `seen`, and True; a task with too few unseen prompts
  (dyck has one prompt) gets its seeded prompts as they come, and False."""
  candidates = [p for p, _ in task.examples(count * 50, seed)]
  fresh = list(dict.fromkeys(p for p in candidates if p not in seen))
  if len(fresh) >= count:
    return fresh[:count], True
  return candidates[:count], False


def encode(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
  """Prompts as a line start ('\\n' + prompt): tokens [B, P] int32 right-padded, lengths [B]."""
  ids = [tokenizer.encode("\n" + t) for t in texts]
  width = max(len(i) for i in ids)
  out = np.full((len(ids), width), tokenizer.PAD_ID, np.int32)
  for row, i in enumerate(ids):
    out[row, :len(i)] = i
  return out, np.asarray([len(i) for i in ids], np.int32)


def answers(tokens, lengths) -> list[list[str | None]]:
  """The answer of each sample (tokens [B, n, N]): its text before the newline, stripped; None
  when empty."""
  return [[tokenizer.decode(seq).strip() or None for seq in row]
          for row in selection.completions(tokens, lengths, NEWLINE)]


class _Counted:
  """A scorer that counts its calls (each is one batched model pass)."""

  def __init__(self, scorer):
    self.scorer, self.calls = scorer, 0

  def __call__(self, tokens, lengths):
    self.calls += 1
    return self.scorer(tokens, lengths)


@functools.lru_cache(maxsize=1 << 16)
def _f1(a: str | None, b: str | None) -> float:
  """Bag-of-tokens F1 of two answers (MBR's utility; None is empty), memoised: answers repeat."""
  return selection.token_f1(tokenizer.encode(a or ""), tokenizer.encode(b or ""))


def evaluate(model, params, task_list: Sequence[tasks.Task], prompts_per_task: int,
             ns: Sequence[int] = NS, seen: set[str] = frozenset(), seed: int = 0,
             temperature: float = 1.0) -> list[dict[str, Any]]:
  """Rows for every (task, method, n) and the tasks' mean ("all"); see the module docstring.

  The number of samples per prompt is S = max(ns); every n must divide it.
  """
  total = max(ns)
  if any(n < 1 or total % n for n in ns):
    raise UserError(f"every n must be >= 1 and divide the largest ({total}); got {list(ns)}")
  task_of, texts, fresh = [], [], {}
  for task in task_list:
    chosen, fresh[task.name] = held_out(task, prompts_per_task, set(seen))
    texts += chosen
    task_of += [task.name] * len(chosen)
  prompt, lengths = encode(texts)
  batch = len(texts)
  max_new = tasks.LINE_WIDTH - min(len(t) for t in texts)
  sampling = SamplingParams(temperature=temperature)
  config = ar.ARConfig(max_new, sampling, eos_id=NEWLINE, pad_id=tokenizer.PAD_ID)
  by_task = {t.name: t for t in task_list}
  check = lambda row, answer: (answer is not None
                               and by_task[task_of[row % batch]].check(texts[row % batch], answer))

  # S samples per prompt in one vmapped run; the n-sample selections use its S / n disjoint groups
  key = jax.random.key(seed)
  args = (jnp.asarray(prompt), jnp.asarray(lengths), key)
  start = time.perf_counter()
  compiled = repeated.sample.lower(ar.sample, (model,), (params,), *args, config, total).compile()
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  out = jax.block_until_ready(compiled((params,), *args))
  sample_s = time.perf_counter() - start
  tokens, counts = np.asarray(out.tokens), np.asarray(out.lengths)  # [B, S, N], [B, S]
  per_sample_calls = np.asarray(out.sample_stats["model_calls"])  # [S]
  found = answers(tokens, counts)
  correct = np.asarray([[check(b, a) for a in row] for b, row in enumerate(found)])  # [B, S]
  scorer = selection.log_likelihood(model, params, prompt, lengths)
  scorer(tokens[:, :1], counts[:, :1])  # compiles for [B, 1, N]; the timed call below too
  start = time.perf_counter()
  log_likelihoods = selection.score(scorer, tokens, counts)  # [B, S]
  score_s = time.perf_counter() - start

  results: dict[int, dict[str, Any]] = {}
  for n in ns:
    copies = total // n
    group = lambda x: x.reshape(batch, copies, n, *x.shape[2:]).swapaxes(0, 1).reshape(
        copies * batch, n, *x.shape[2:])  # row c * B + b: samples c * n .. c * n + n - 1 of b
    found_n = [[found[b][c * n + i] for i in range(n)] for c in range(copies) for b in range(batch)]
    picks, walls, calls, spent = {}, {}, {}, {}
    start = time.perf_counter()
    picks["majority_vote"] = selection.majority_vote(found_n)
    walls["majority_vote"] = time.perf_counter() - start
    start = time.perf_counter()
    picks["mbr"] = selection.mbr(found_n, _f1)
    walls["mbr"] = time.perf_counter() - start
    start = time.perf_counter()
    picks["best_of_n"] = selection.best_of_n(group(log_likelihoods))
    walls["best_of_n"] = time.perf_counter() - start + score_s / copies
    # a run of n samples (group 0, keys fold_in(key, i), i < n) makes 1 + max(calls_i - 1) passes
    sample_calls = 1 + int(np.max(per_sample_calls[:n] - 1))
    for method in ("majority_vote", "mbr", "best_of_n"):
      walls[method] += sample_s / copies
      calls[method] = sample_calls + (method == "best_of_n")
      spent[method] = float(np.sum(counts)) / copies
    grouped_correct = group(correct)
    chosen = {m: grouped_correct[np.arange(copies * batch), picks[m]] for m in picks}

    # first-finish and reward-pruned decode for real: every prompt repeated S / n times
    rep_prompt, rep_lengths = np.tile(prompt, (copies, 1)), np.tile(lengths, copies)
    pkey = jax.random.fold_in(key, n)
    pcfg = pruned.PrunedConfig(n, max_new, score_every=PRUNE_EVERY, keep_fraction=PRUNE_KEEP,
                               sampling=sampling, eos_id=NEWLINE, pad_id=tokenizer.PAD_ID)
    rep_scorer = selection.log_likelihood(model, params, rep_prompt, rep_lengths)
    for method in ("first_finish", "reward_pruned"):
      start = time.perf_counter()
      if method == "first_finish":
        res = pruned.first_finish(model, params, rep_prompt, rep_lengths, pkey, pcfg)
        scoring = 0
      else:
        partial = _Counted(parallel_sampling.mean_log_likelihood(model, params, rep_prompt,
                                                                 rep_lengths))
        final = _Counted(rep_scorer)
        res = pruned.reward_pruned(model, params, rep_prompt, rep_lengths, pkey, pcfg, partial,
                                   final)
        scoring = partial.calls + final.calls
      walls[method] = time.perf_counter() - start  # includes compiling its decode loops
      calls[method] = res.stats["model_calls"] + scoring
      spent[method] = res.stats["generated_tokens"] / copies  # per S / n copies, like the others
      picked = answers(res.tokens[:, None], res.lengths[:, None])
      chosen[method] = np.asarray([check(r, row[0]) for r, row in enumerate(picked)])
    results[n] = {"chosen": chosen, "walls": walls, "calls": calls, "spent": spent,
                  "copies": copies}

  rows = []
  prompt_task = np.asarray(task_of)
  for name in [t.name for t in task_list]:
    mine = prompt_task == name
    base = {"task": name, "chance_accuracy": by_task[name].chance,
            "single_sample_accuracy": round(float(np.mean(correct[mine])), 4),
            "held_out_prompts": fresh[name], "prompts": int(mine.sum())}
    for n in ns:
      r = results[n]
      rep_mine = np.tile(mine, r["copies"])
      p = coverage.coverage(correct[mine], n)
      rows.append(base | {"method": "pass_at_k", "n": n, "accuracy": round(p, 4),
                          "pass_at_k": round(p, 4), "model_calls": r["calls"]["majority_vote"],
                          "generated_tokens": r["spent"]["majority_vote"],
                          "wall_s": round(sample_s / r["copies"], 4),
                          "compile_s": round(compile_s, 3)})
      for method in METHODS[1:]:
        row = base | {"method": method, "n": n,
                      "accuracy": round(float(np.mean(r["chosen"][method][rep_mine])), 4),
                      "model_calls": r["calls"][method],
                      "generated_tokens": round(r["spent"][method], 1),
                      "wall_s": round(r["walls"][method], 4)}
        if method in ("first_finish", "reward_pruned"):
          plain_calls, plain_tokens = r["calls"]["best_of_n"], r["spent"]["best_of_n"]
          row |= {"model_calls_saved_vs_best_of_n": plain_calls - r["calls"][method],
                  "compute_saved_vs_best_of_n": round(1 - r["spent"][method] / plain_tokens, 4),
                  "wall_includes_compile": True}
        rows.append(row)
  return rows + _mean_rows(rows, [t.name for t in task_list])


def _mean_rows(rows: list[dict[str, Any]], names: list[str]) -> list[dict[str, Any]]:
  """Rows of task "all": the mean over tasks of accuracy, pass@k and chance per (method, n)."""
  out = []
  for r in rows:
    if r["task"] != names[0]:
      continue
    group = [s for s in rows if s["method"] == r["method"] and s["n"] == r["n"]]
    mean = lambda field: round(float(np.mean([s[field] for s in group])), 4)
    row = {k: v for k, v in r.items() if k not in ("held_out_prompts", "prompts")}
    row |= {"task": "all", "accuracy": mean("accuracy"), "chance_accuracy": mean("chance_accuracy"),
            "single_sample_accuracy": mean("single_sample_accuracy")}
    if "pass_at_k" in r:
      row["pass_at_k"] = mean("pass_at_k")
    out.append(row)
  return out


def coverage_fits(rows: list[dict[str, Any]]) -> dict[str, Any]:
  """Per task, the fit C(k) = exp(a k^b) of its pass@k curve (None where a value is 0)."""
  fits = {}
  for name in dict.fromkeys(r["task"] for r in rows):
    curve = {r["n"]: r["pass_at_k"] for r in rows
             if r["task"] == name and r["method"] == "pass_at_k"}
    if min(curve.values()) > 0 and len(curve) > 1:
      fit = coverage.fit_power_law(curve)
      fits[name] = {"a": round(fit.a, 4), "b": round(fit.b, 4), "rmse": round(fit.rmse, 4)}
    else:
      fits[name] = None
  return fits


def print_tables(rows: list[dict[str, Any]]) -> None:
  """Accuracy per (task, n) with one column per method, then the cost per n."""
  table = {}
  for r in rows:
    entry = table.setdefault((r["task"], r["n"]), {"task": r["task"], "n": r["n"],
                                                   "chance": r["chance_accuracy"],
                                                   "single": r["single_sample_accuracy"]})
    entry[r["method"]] = r["accuracy"]
  harness.print_table(list(table.values()), ["task", "n", "chance", "single", *METHODS])
  print()
  cost = [{"n": r["n"], "method": r["method"], "model_calls": r["model_calls"],
           "generated_tokens": r["generated_tokens"], "wall_s": r["wall_s"],
           "calls_saved": r.get("model_calls_saved_vs_best_of_n", ""),
           "compute_saved": r.get("compute_saved_vs_best_of_n", "")}
          for r in rows if r["task"] == "all" and r["method"] != "pass_at_k"]
  harness.print_table(cost, ["n", "method", "model_calls", "generated_tokens", "wall_s",
                             "calls_saved", "compute_saved"])


def prepare(root: Path, train_steps: int | None = None, corpus_lines: int = CORPUS_LINES):
  """(run, corpus path): the corpus written into `root`, `tasks_lm` trained on it (cached)."""
  corpus = root / "tasks_corpus.txt"
  if not corpus.exists():
    tasks.write_corpus(corpus, corpus_lines, CORPUS_SEED, CORPUS_TASKS)
  overrides = [f"data.path={corpus}"]
  if train_steps:
    overrides += [f"train.steps={train_steps}", f"checkpoint.every_steps={train_steps}"]
  return trained(EXPERIMENT, root / EXPERIMENT, overrides), corpus


def run(workdir: str | None, out: str | None, prompts_per_task: int = 8,
        ns: Sequence[int] = NS, train_steps: int | None = None,
        corpus_lines: int = CORPUS_LINES) -> dict[str, Any]:
  """Runs the suite; `train_steps` / `corpus_lines` shorten training (tests, smoke runs)."""
  registry.load_modules()
  root = Path(workdir or Path.home() / ".cache" / "paxlike" / "bench").expanduser()
  root.mkdir(parents=True, exist_ok=True)
  lm, corpus = prepare(root, train_steps, corpus_lines)
  model, params, _ = lm.restore()
  start = time.perf_counter()
  rows = evaluate(model, params, tasks.get(CORPUS_TASKS), prompts_per_task, ns,
                  corpus_prompts(corpus))
  print_tables(rows)
  config = {"experiment": EXPERIMENT, "train_steps": lm.exp.train.steps,
            "corpus": str(corpus), "corpus_lines": corpus_lines, "tasks": list(CORPUS_TASKS),
            "prompts_per_task": prompts_per_task, "samples_per_prompt": max(ns), "ns": list(ns),
            "temperature": 1.0, "prune_every": PRUNE_EVERY, "prune_keep": PRUNE_KEEP,
            "coverage_fits": coverage_fits(rows),
            "evaluate_s": round(time.perf_counter() - start, 1)}
  return harness.write_report(out, "scaling", config, rows)

"""The `diffusion` suite's rows of the exact diffusion-drafted AR decoder
(`samplers.diffusion_drafted`), of APD (`samplers.apd`, its lossy mixture rule) and of their peer,
speculative decoding with a separate causal draft (`samplers.speculative`): the suite's causal
model (the AR judge, `tasks_ar`) answers every held-out prompt greedily, its drafts drawn from
the bidirectional MDLM's marginals (or from the draft model), against plain greedy AR
(`samplers.ar`) on the same prompts.

A row's prompt is its canvas up to the first mask (the solved example line, then the prompt); both
decoders generate the task's answer_length tokens. The pair is timed interleaved, `repeats`
back-to-back (AR, drafted) calls after a compile warm-up: `speedup_vs_ar` is the median of the
pairs' time ratios (`speedup_range` their min and max). `greedy_equal_ar` compares the tokens,
`task_accuracy` scores the drafted answers (the AR model's, when greedy-equal)."""

from __future__ import annotations

import statistics
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from paxlike import timing, tokenizer
from samplers import ar, diffusion_drafted, speculative
from samplers.core.logits import SamplingParams

GAMMAS = (2, 4, 8)  # drafted tokens per round (at most the answer's length)
KINDS = ("diffusion_drafted", "apd", "speculative")  # the rows' `sampler`
GREEDY = SamplingParams(temperature=0.0)


def prompts_of(canvas: np.ndarray, mask_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Each row's tokens before its first mask: (prompt [B, P] right-padded, lengths [B])."""
  return ar.pad_prompts([row[:int(np.argmax(row == mask_id))] for row in canvas])


def _compiled(fn, *args):
  """`fn(*args)` compiled once (the config is the last, static argument)."""
  compiled = fn.lower(*args).compile()
  dynamic = [a for a in args[:-1] if not _static(a)]
  return lambda: jax.block_until_ready(compiled(*dynamic))


def _static(value: Any) -> bool:
  return hasattr(value, "__dataclass_fields__") and not isinstance(value, jax.Array)


def task_row(ar_pair, drafter_pair, task, canvas: np.ndarray, prompts: list[str], mask_id: int,
             gamma: int, repeats: int, mixture: float = 0.0,
             kind: str = "diffusion_drafted") -> dict[str, Any]:
  """The row of one task at draft length `gamma` (clipped to the answer's length:
  `num_draft_tokens`); `mixture` > 0: APD's lossy rule (`samplers.apd`), row `apd`; `kind`
  "speculative": `drafter_pair` is a causal draft model (`samplers.speculative`)."""
  (target, target_params), (drafter, drafter_params) = ar_pair, drafter_pair
  prompt, lengths = (jnp.asarray(a) for a in prompts_of(canvas, mask_id))
  new, key = task.answer_length, jax.random.key(0)
  plain = _compiled(ar.sample, target, target_params, prompt, lengths, key,
                    ar.ARConfig(max_new_tokens=new, sampling=GREEDY))
  if kind == "speculative":
    fn, config = speculative.sample, speculative.SpeculativeConfig(min(gamma, new), new,
                                                                   sampling=GREEDY)
  else:
    fn, config = diffusion_drafted.sample, diffusion_drafted.DiffusionDraftedConfig(
        min(gamma, new), new, sampling=GREEDY, mixture=mixture)
  drafted = _compiled(fn, target, target_params, drafter, drafter_params, prompt, lengths, key,
                      config)
  plain(), drafted()  # warm-up
  (ar_times, times), (ar_out, out) = timing.interleaved_times([plain, drafted], repeats)
  ratios = [a / d for a, d in zip(ar_times, times)]
  tokens = np.asarray(out.tokens)
  answers = [tokenizer.decode(row) for row in tokens]
  generated = float(out.stats["generated_tokens"])
  return {
      "sampler": "apd" if mixture else kind,
      "setting": f"R={mixture}, g={gamma}" if mixture else f"g={gamma}", "task": task.name,
      "temperature": 0.0, "batch": len(canvas), "num_draft_tokens": min(gamma, new),
      "tokens_per_target_call": round(float(out.stats["tokens_per_target_call"]), 3),
      "acceptance": round(float(out.stats["acceptance"]), 3),
      "task_accuracy": round(sum(task.check(p, a) for p, a in zip(prompts, answers))
                             / len(prompts), 4),
      "chance_accuracy": float(f"{task.chance:.4g}"),
      "tokens_per_s": round(generated / statistics.median(times), 1),
      "ar_tokens_per_s": round(generated / statistics.median(ar_times), 1),
      "speedup_vs_ar": round(statistics.median(ratios), 3),
      "speedup_range": [round(min(ratios), 3), round(max(ratios), 3)],
      "greedy_equal_ar": bool(np.array_equal(tokens, np.asarray(ar_out.tokens))),
      "exact": not mixture, "generated_tokens": generated,
  }


def rows(ar_pair, drafter_pair, suite, batches: dict, mask_id: int, repeats: int,
         gammas: tuple[int, ...] = GAMMAS, mixture: float = 0.0,
         kind: str = "diffusion_drafted") -> list[dict[str, Any]]:
  """One row per gamma and task (`task_row`), and per gamma an `all` row: accuracy over every
  prompt, tokens/s and tokens per target call weighted by the tokens generated, speedup the
  median of the tasks' medians."""
  out = []
  for gamma in gammas:
    per_task = [task_row(ar_pair, drafter_pair, task, *batches[task.name], mask_id, gamma,
                         repeats, mixture, kind) for task in suite]
    out += per_task
    weight = [r["generated_tokens"] for r in per_task]
    mean = lambda key: round(float(np.average([r[key] for r in per_task], weights=weight)), 3)
    out.append(dict(
        per_task[0], task="all", num_draft_tokens=max(r["num_draft_tokens"] for r in per_task),
        tokens_per_target_call=mean(
            "tokens_per_target_call"), acceptance=mean("acceptance"),
        task_accuracy=round(float(np.mean([r["task_accuracy"] for r in per_task])), 4),
        chance_accuracy=None, tokens_per_s=mean("tokens_per_s"),
        ar_tokens_per_s=mean("ar_tokens_per_s"),
        speedup_vs_ar=round(statistics.median(r["speedup_vs_ar"] for r in per_task), 3),
        speedup_range=[min(r["speedup_range"][0] for r in per_task),
                       max(r["speedup_range"][1] for r in per_task)],
        greedy_equal_ar=all(r["greedy_equal_ar"] for r in per_task), generated_tokens=sum(weight)))
  return out

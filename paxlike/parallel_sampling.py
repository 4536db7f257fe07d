"""`sampler.num_samples` and `sampler.selection` for the CLI: n samples per prompt, then one pick.

- none: all n samples are returned (prompt-major rows [B * n, N]).
- best_of_n: the sample with the highest total log-likelihood under the (target) model.
- majority: self-consistency over the decoded completions (the text up to eos, stripped).
- mbr: minimum Bayes risk with bag-of-tokens F1 as the utility.
- first_finish: decode the n samples and stop once each prompt has one that emitted eos
  (`samplers.pruned.first_finish`; sampler.kind=ar).
- reward_pruned: speculative rejection (`samplers.pruned.reward_pruned`; sampler.kind=ar),
  scored every `sampler.prune_every` tokens by mean token log-likelihood, keeping
  `sampler.prune_keep` of the survivors.

The other selections sample with `samplers.repeated.sample` around the sampler of `sampler.kind`,
the causal kinds and the diffusion-style (canvas) kinds alike. A canvas kind's samples are its
completed canvases, read as the tokens after the prompt up to the first eos; best_of_n scores
with the causal model's log-likelihood, which a denoiser does not give, so the canvas kinds take
the selections of `CANVAS_SELECTIONS` (none, majority, mbr), which only read the samples' tokens.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from paxlike import tokenizer
from paxlike.config import SELECTIONS, SamplerConfig
from paxlike.errors import UserError
from samplers import pruned, repeated, selection

AR_ONLY = ("first_finish", "reward_pruned")
CANVAS_SELECTIONS = ("none", "majority", "mbr")  # those that need no causal log-likelihood


def _answers(tokens: np.ndarray, lengths: np.ndarray) -> list[list[str | None]]:
  return [[tokenizer.decode(seq).strip() or None for seq in row]
          for row in selection.completions(tokens, lengths, tokenizer.EOS_ID)]


def choose(rule: str, tokens: np.ndarray, lengths: np.ndarray, scorer) -> np.ndarray:
  """index [B] of the sample `rule` picks among tokens [B, n, N] (scorer: log-likelihood)."""
  if rule == "best_of_n":
    return selection.best_of_n(selection.score(scorer, tokens, lengths))
  if rule == "majority":
    return selection.majority_vote(_answers(tokens, lengths))
  if rule == "mbr":
    return selection.mbr(selection.completions(tokens, lengths, tokenizer.EOS_ID),
                         selection.token_f1)
  if rule == "first_finish":
    return selection.first_finish(tokens, lengths, tokenizer.EOS_ID)
  raise UserError(f"sampler.selection={rule!r} is unknown; valid: {', '.join(SELECTIONS)}")


def mean_log_likelihood(model, params, prompt, prompt_lengths):
  """A scorer: mean token log-likelihood of each (partial) sample under the model."""
  total = selection.log_likelihood(model, params, prompt, prompt_lengths)
  return lambda tokens, lengths: total(tokens, lengths) / np.maximum(lengths, 1)


def check_selection(cfg: SamplerConfig) -> None:
  """UserError when `sampler.num_samples` / `sampler.selection` cannot run with `sampler.kind`."""
  n, rule = cfg.num_samples, cfg.selection
  if n < 1:
    raise UserError(f"sampler.num_samples must be >= 1, got {n}")
  if rule not in SELECTIONS:
    raise UserError(f"sampler.selection={rule!r} is unknown; valid: {', '.join(SELECTIONS)}")
  if cfg.spec.takes_canvas and rule not in CANVAS_SELECTIONS:
    raise UserError(f"sampler.selection={rule} needs a causal model's log-likelihood or AR "
                    f"decoding; sampler.kind={cfg.kind} fills a canvas: use sampler.selection="
                    f"{', '.join(CANVAS_SELECTIONS)}")
  if rule in AR_ONLY and cfg.kind != "ar":
    raise UserError(f"sampler.selection={rule} decodes with its own AR loop; set sampler.kind=ar "
                    f"(got {cfg.kind})")


def decode(fn, leading: tuple, config, prompt: np.ndarray, lengths: np.ndarray,
           cfg: SamplerConfig, model, params, data: tuple | None = None,
           finish=None) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
  """n samples per prompt and the selection of `cfg`; returns (tokens, lengths, stats).

  `fn(*leading, *data, key, config)` is the sampler of `cfg.kind`; data defaults to (prompt,
  lengths) (a causal kind), a canvas kind passes (canvas,) and `finish`, which maps completed
  canvases [B, n, L] to (generated tokens [B, n, N] cut after eos, their lengths [B, n]).
  `model` / `params` score samples (best_of_n, reward_pruned) and decode first_finish /
  reward_pruned. tokens are [B, N] (one pick per prompt), or [B * n, N] with selection none;
  `wall_s` includes compiling.
  """
  check_selection(cfg)
  n, rule = cfg.num_samples, cfg.selection
  prompt_j, lengths_j = jnp.asarray(prompt), jnp.asarray(lengths)
  data = (prompt_j, lengths_j) if data is None else data
  key = jax.random.key(cfg.seed)
  start = time.perf_counter()
  if rule in AR_ONLY:
    pcfg = pruned.PrunedConfig(num_samples=n, max_new_tokens=config.max_new_tokens,
                               score_every=cfg.prune_every, keep_fraction=cfg.prune_keep,
                               sampling=config.sampling, eos_id=config.eos_id,
                               pad_id=config.pad_id)
    try:
      if rule == "first_finish":
        out = pruned.first_finish(model, params, prompt_j, lengths_j, key, pcfg)
      else:
        out = pruned.reward_pruned(model, params, prompt_j, lengths_j, key, pcfg,
                                   mean_log_likelihood(model, params, prompt, lengths))
    except ValueError as e:
      raise UserError(str(e)) from None
    tokens, counts, raw_stats = out.tokens, out.lengths, dict(out.stats)
    raw_stats["sample_index"] = out.sample_index.tolist()
  else:
    try:
      out = jax.block_until_ready(repeated.sample(fn, tuple(leading[0::2]), tuple(leading[1::2]),
                                                  *data, key, config, n))
    except ValueError as e:
      raise UserError(str(e)) from None
    all_tokens, all_counts = np.asarray(out.tokens), np.asarray(out.lengths)
    if finish is not None:
      all_tokens, all_counts = finish(all_tokens)
    raw_stats = {name: int(value) for name, value in out.stats.items()}
    if rule == "none":
      tokens, counts = all_tokens.reshape(-1, all_tokens.shape[2]), all_counts.reshape(-1)
    else:
      index = choose(rule, all_tokens, all_counts,
                     selection.log_likelihood(model, params, prompt, lengths))
      tokens, counts = selection.take(all_tokens, all_counts, index)
      raw_stats["sample_index"] = index.tolist()
  wall_s = time.perf_counter() - start
  stats = {"sampler": cfg.kind, "selection": rule, "num_samples": n, "batch": len(prompt),
           "tokens": int(np.sum(counts)), "wall_s": round(wall_s, 4), **raw_stats}
  return np.asarray(tokens), np.asarray(counts), stats

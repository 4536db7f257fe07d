"""Best-of-n that spends less: reward-pruned sampling (speculative rejection) and first-finish.

Both decode the n samples of each prompt autoregressively over per-sample row caches
(`samplers.core.rows`), so samples can be dropped mid-decode and the batch shrinks:

- `reward_pruned` (Sun et al. 2024, "Fast Best-of-N Decoding via Speculative Rejection"): start
  n samples, every m tokens score the partial samples and keep the best fraction of each prompt's
  survivors, continue; at the end return the best survivor under the final scorer. Pruning trades
  exactness of best-of-n for compute: the result is the best of the survivors, which is the
  best-of-n pick whenever the partial scores rank that sample among the kept ones.
- `first_finish`: decode all n and stop as soon as every prompt has a sample that emitted eos;
  return that sample (the earliest to finish; `selection.first_finish` on full samples picks
  the same one).

Sample i of prompt b draws the token at absolute position t with fold_in(k_bi, t), where k_bi =
split(fold_in(key, i), B)[b]: exactly the randomness of `samplers.repeated.sample(ar.sample, ...)`
with the same key, so every surviving sample equals, token for token, the i-th sample of plain
repeated AR sampling, and keep_fraction = 1 returns the plain best-of-n choice.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from samplers import selection
from samplers.core import emit, rng, rows
from samplers.core.logits import SamplingParams, sample_token
from samplers.core.protocol import (CausalModel, check_max_new_tokens, last_prompt_logits,
                               prefill_method, prompt_positions)
from samplers.repeated import sample_keys


@dataclasses.dataclass(frozen=True)
class PrunedConfig:
  """Attributes:
    num_samples: n >= 1 samples started per prompt.
    max_new_tokens: N, tokens generated per sample at most.
    score_every: m >= 1, tokens between two prunings (reward_pruned).
    keep_fraction: share of each prompt's surviving samples kept at a pruning, in (0, 1].
    min_keep: pruning never leaves fewer samples per prompt than this (>= 1).
    sampling, eos_id, pad_id: as in `ar.ARConfig`.
  """

  num_samples: int
  max_new_tokens: int
  score_every: int = 8
  keep_fraction: float = 0.5
  min_keep: int = 1
  sampling: SamplingParams = SamplingParams()
  eos_id: int | None = None
  pad_id: int = 0

  def __post_init__(self):
    if self.num_samples < 1:
      raise ValueError(f"num_samples (n) must be >= 1, got {self.num_samples}")
    check_max_new_tokens(self.max_new_tokens)
    if self.score_every < 1:
      raise ValueError(f"score_every (m) must be >= 1, got {self.score_every}")
    if not 0 < self.keep_fraction <= 1:
      raise ValueError(f"keep_fraction must be in (0, 1], got {self.keep_fraction}")
    if not 1 <= self.min_keep:
      raise ValueError(f"min_keep must be >= 1, got {self.min_keep}")


@flax.struct.dataclass
class PrunedOutput:
  """Attributes:
    tokens: [B, N] int32 the chosen sample of each prompt; lengths: [B] int32.
    sample_index: [B] int32 which of the n started samples (0..n-1) was chosen.
    scores: [B] float32 its final score (0 for first_finish).
    stats: `model_calls` (batched passes, the shared prefill included), `generated_tokens`
      (tokens drawn over all samples, pruned ones included), `row_steps` (sample-rows times decode
      passes: the decode compute), `surviving_samples` (samples alive at the end, all prompts).
  """

  tokens: np.ndarray
  lengths: np.ndarray
  sample_index: np.ndarray
  scores: np.ndarray
  stats: dict[str, int]


@flax.struct.dataclass
class _Rows:
  """Decode state of R sample rows (grouped by prompt: [B, r] flattened)."""

  caches: Any
  pending: jax.Array  # [R, V] logits of the next token
  tokens: jax.Array  # [R, N] generated tokens
  n: jax.Array  # [R] tokens generated
  done: jax.Array  # [R]
  eos: jax.Array  # [R] finished by emitting eos
  keys: jax.Array  # [R] typed keys
  prompt_lengths: jax.Array  # [R]
  sample_id: jax.Array  # [R] index among the n started samples


@functools.partial(jax.jit, static_argnames=("model", "config"))
def _start(model: CausalModel, params, prompt, prompt_lengths, key, config: PrunedConfig) -> _Rows:
  """Prefills each prompt once and repeats its cache for its n samples."""
  batch, prompt_len = prompt.shape
  n = config.num_samples
  caches = rows.init(model, batch, prompt_len + config.max_new_tokens + 1)
  logits, caches = rows.call(prefill_method(model), params, prompt, prompt_positions(prompt),
                             caches)
  caches = rows.repeat(rows.set_lengths(caches, prompt_lengths), n)
  last = last_prompt_logits(logits, prompt_lengths)
  keys = jax.vmap(lambda k: rng.row_keys(k, batch))(sample_keys(key, n))  # [n, B]
  count = batch * n
  return _Rows(caches=caches, pending=jnp.repeat(last, n, axis=0),
               tokens=jnp.full((count, config.max_new_tokens), config.pad_id, jnp.int32),
               n=jnp.zeros((count,), jnp.int32), done=jnp.zeros((count,), bool),
               eos=jnp.zeros((count,), bool), keys=keys.T.reshape(count),
               prompt_lengths=jnp.repeat(prompt_lengths, n),
               sample_id=jnp.tile(jnp.arange(n, dtype=jnp.int32), batch))


@functools.partial(jax.jit, static_argnames=("model", "config", "steps", "batch", "until_first"))
def _decode(model: CausalModel, params, state: _Rows, config: PrunedConfig, steps: int,
            batch: int, until_first: bool) -> tuple[_Rows, jax.Array]:
  """Up to `steps` AR tokens for every row; stops early when all rows are done or, with
  `until_first`, when every prompt has a row that emitted eos. Returns (state, passes)."""
  count = state.n.shape[0]
  index = jnp.arange(count)

  def cond(carry):
    s, step = carry
    go = (step < steps) & ~jnp.all(s.done)
    if until_first:
      go &= ~jnp.all(jnp.any(s.eos.reshape(batch, -1), axis=1))
    return go

  def body(carry):
    s, step = carry
    position = s.prompt_lengths + s.n
    token = jax.vmap(sample_token, in_axes=(0, 0, None))(
        rng.position_keys(s.keys, position), s.pending, config.sampling)
    token, stopped, n = emit.token(token, s.done, s.n, config.eos_id, config.pad_id)
    tokens = s.tokens.at[index, s.n].set(token, mode="drop")
    hit_eos = stopped & ~s.done
    logits, caches = rows.call(model.apply, params, token[:, None], position[:, None], s.caches)
    caches = rows.set_lengths(caches, s.prompt_lengths + n)
    s = s.replace(caches=caches, pending=logits[:, 0], tokens=tokens, n=n, eos=s.eos | hit_eos,
                  done=stopped | (n >= config.max_new_tokens))
    return s, step + 1

  return jax.lax.while_loop(cond, body, (state, jnp.int32(0)))


def _take(state: _Rows, index: np.ndarray) -> _Rows:
  return jax.tree.map(lambda leaf: leaf[jnp.asarray(index)], state)


def _grouped(state: _Rows, batch: int) -> tuple[np.ndarray, np.ndarray]:
  tokens, n = np.asarray(state.tokens), np.asarray(state.n)
  return tokens.reshape(batch, -1, tokens.shape[1]), n.reshape(batch, -1)


def _output(state: _Rows, batch: int, choice: np.ndarray, scores: np.ndarray,
            stats: dict[str, int]) -> PrunedOutput:
  tokens, lengths = _grouped(state, batch)
  sample_id = np.asarray(state.sample_id).reshape(batch, -1)
  chosen = np.arange(batch)
  stats["surviving_samples"] = int(np.asarray(state.n).shape[0])
  return PrunedOutput(tokens=tokens[chosen, choice], lengths=lengths[chosen, choice],
                      sample_index=sample_id[chosen, choice].astype(np.int32),
                      scores=np.asarray(scores, np.float32), stats=stats)


def _check(model: CausalModel, prompt, config: PrunedConfig) -> None:
  need = prompt.shape[1] + config.max_new_tokens + 1
  if need > model.max_len:
    raise ValueError(f"prompt length {prompt.shape[1]} + max_new_tokens {config.max_new_tokens} "
                     f"+ 1 = {need} exceeds the model's max_len {model.max_len}")


def reward_pruned(model: CausalModel, params, prompt, prompt_lengths, key: jax.Array,
                  config: PrunedConfig, scorer: selection.Scorer,
                  final_scorer: selection.Scorer | None = None) -> PrunedOutput:
  """Speculative-rejection best-of-n (Sun et al. 2024) with AR sampling.

  Args:
    model, params: any `CausalModel` and its parameters.
    prompt: [B, P] int32 right-padded prompts; prompt_lengths: [B] int32.
    key: one key (see the module docstring for the per-sample streams).
    config: `PrunedConfig`.
    scorer: scores partial samples every m tokens: (tokens [B, r, N], lengths [B, r]) -> [B, r]
      (a reward model, a verifier, `selection.log_likelihood`, ...).
    final_scorer: scores the finished survivors (default: `scorer`).
  Returns:
    PrunedOutput; compare its stats with plain best-of-n (`repeated.sample`) for the saving.
  """
  _check(model, prompt, config)
  batch = prompt.shape[0]
  state = _start(model, params, jnp.asarray(prompt, jnp.int32),
                 jnp.asarray(prompt_lengths, jnp.int32), key, config)
  calls, row_steps, dropped_tokens, alive = 1, 0, 0, config.num_samples
  while True:
    state, passes = _decode(model, params, state, config, config.score_every, batch, False)
    calls += int(passes)
    row_steps += int(passes) * batch * alive
    if bool(jnp.all(state.done)):
      break
    keep = min(alive, max(config.min_keep, math.ceil(config.keep_fraction * alive)))
    if keep < alive:
      scores = selection.score(scorer, *_grouped(state, batch))
      best = np.argsort(-scores, axis=1, kind="stable")[:, :keep]
      best.sort(axis=1)  # keep survivors in their original order
      kept = (np.arange(batch)[:, None] * alive + best).reshape(-1)
      dropped_tokens += int(np.sum(np.asarray(state.n))) - int(np.sum(np.asarray(state.n)[kept]))
      state = _take(state, kept)
      alive = keep
  scores = selection.score(final_scorer or scorer, *_grouped(state, batch))
  choice = selection.best_of_n(scores)
  stats = {"model_calls": calls, "row_steps": row_steps,
           "generated_tokens": dropped_tokens + int(np.sum(np.asarray(state.n)))}
  return _output(state, batch, choice, scores[np.arange(batch), choice], stats)


def first_finish(model: CausalModel, params, prompt, prompt_lengths, key: jax.Array,
                 config: PrunedConfig) -> PrunedOutput:
  """n samples per prompt, stopped once every prompt has a sample that emitted eos.

  Returns each prompt's sample that emitted eos after the fewest tokens (ties: lowest sample
  index), or its shortest sample if none did within N tokens (then all are N long: sample 0).
  Needs `config.eos_id`; score_every / keep_fraction are unused.
  """
  if config.eos_id is None:
    raise ValueError("first_finish needs an eos_id: it stops at the first sample to emit eos")
  _check(model, prompt, config)
  batch = prompt.shape[0]
  state = _start(model, params, jnp.asarray(prompt, jnp.int32),
                 jnp.asarray(prompt_lengths, jnp.int32), key, config)
  state, passes = _decode(model, params, state, config, config.max_new_tokens, batch, True)
  tokens, lengths = _grouped(state, batch)
  eos = np.asarray(state.eos).reshape(batch, -1)
  choice = np.argmin(np.where(eos, lengths, config.max_new_tokens + 1 + lengths), axis=1)
  stats = {"model_calls": 1 + int(passes), "row_steps": int(passes) * len(eos.ravel()),
           "generated_tokens": int(lengths.sum())}
  return _output(state, batch, choice, np.zeros(batch), stats)

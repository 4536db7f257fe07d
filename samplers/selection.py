"""Picking one of n samples per prompt: best-of-n, self-consistency votes, MBR, first-finish.

Every rule takes the n samples of B prompts (`tokens [B, n, N]`, `lengths [B, n]`, as returned by
`samplers.repeated.sample`) or what was computed from them, and returns `index [B]` int: which
sample of each prompt is chosen (`take` gathers it). Rules run on the host (numpy) after the
compiled sampling; only `log_likelihood` calls the model.

- Best-of-n (Stiennon et al. 2020; Nakano et al. 2021): the highest score under a scorer, e.g. the
  model's own log-likelihood, a reward model or a verifier (`score` checks its output shape).
- Self-consistency (Wang et al. 2023): the most frequent extracted answer; ties go to the answer
  seen first. Perplexity-weighted voting weighs each vote by exp(mean token log-likelihood).
- Minimum Bayes risk (Kumar & Byrne 2004; Bertsch et al. 2023): the sample with the highest
  expected utility against the other samples, for a pluggable utility.
- First-finish: the sample that emits eos after the fewest tokens, i.e. the one a parallel decode
  that stops at the first eos would return (`samplers.pruned.first_finish` runs that decode).
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from samplers.core.protocol import CausalModel, prefill

# scorer(tokens [B, n, N] int32, lengths [B, n] int32) -> scores [B, n] float
Scorer = Callable[[np.ndarray, np.ndarray], Any]
# utility(candidate tokens, reference tokens) -> float (1-D int arrays, eos/padding excluded)
Utility = Callable[[np.ndarray, np.ndarray], float]


def _check_samples(tokens, lengths) -> tuple[np.ndarray, np.ndarray]:
  tokens, lengths = np.asarray(tokens), np.asarray(lengths)
  if tokens.ndim != 3 or lengths.shape != tokens.shape[:2]:
    raise ValueError(f"samples must be tokens [B, n, N] with lengths [B, n]; got tokens "
                     f"{tokens.shape} and lengths {lengths.shape}")
  return tokens, lengths


def score(scorer: Scorer, tokens, lengths) -> np.ndarray:
  """scorer(tokens, lengths) as float64 [B, n]; ValueError naming the shape if it is not."""
  tokens, lengths = _check_samples(tokens, lengths)
  scores = np.asarray(scorer(tokens, lengths), np.float64)
  if scores.shape != lengths.shape:
    raise ValueError(f"the scorer returned shape {scores.shape}; it must return one score per "
                     f"sample, shape [B, n] = {lengths.shape}")
  return scores


def best_of_n(scores) -> np.ndarray:
  """index [B] of each prompt's highest score (scores [B, n]; ties: the first; NaN never wins)."""
  scores = np.asarray(scores, np.float64)
  if scores.ndim != 2:
    raise ValueError(f"scores must be [B, n], got shape {scores.shape}")
  return np.argmax(np.where(np.isnan(scores), -np.inf, scores), axis=1)


def take(tokens, lengths, index) -> tuple[np.ndarray, np.ndarray]:
  """The chosen samples: (tokens [B, N], lengths [B]) at index [B]."""
  tokens, lengths = _check_samples(tokens, lengths)
  rows = np.arange(len(index))
  return tokens[rows, index], lengths[rows, index]


def weighted_vote(answers: Sequence[Sequence[Hashable | None]],
                  weights=None) -> np.ndarray:
  """Self-consistency (Wang et al. 2023): index [B] of a sample carrying the winning answer.

  Args:
    answers: B lists of n extracted answers; None marks a sample with no answer (never votes).
    weights: [B, n] non-negative vote weights; None counts every vote once (majority vote).
  Returns:
    For each prompt, the first sample whose answer has the largest total weight (ties: the
    answer seen first); 0 when no sample has an answer.
  """
  if weights is not None:
    weights = np.asarray(weights, np.float64)
    if weights.shape != (len(answers), len(answers[0]) if answers else 0):
      raise ValueError(f"weights must be [B, n] like the answers ({len(answers)} prompts); got "
                       f"shape {weights.shape}")
    if np.any(weights < 0) or np.any(np.isnan(weights)):
      raise ValueError("vote weights must be non-negative numbers")
  index = []
  for b, row in enumerate(answers):
    totals: dict[Hashable, float] = {}
    for i, answer in enumerate(row):
      if answer is not None:
        totals[answer] = totals.get(answer, 0.0) + (1.0 if weights is None else weights[b, i])
    if not totals:
      index.append(0)
      continue
    winner = max(totals, key=totals.__getitem__)  # max keeps the first of equal totals
    index.append(list(row).index(winner))
  return np.asarray(index, np.int64)


def majority_vote(answers: Sequence[Sequence[Hashable | None]]) -> np.ndarray:
  """Self-consistency majority vote: `weighted_vote` with one vote per sample."""
  return weighted_vote(answers)


def perplexity_weights(log_likelihoods, lengths) -> np.ndarray:
  """[B, n] vote weights exp(mean token log-likelihood) = 1 / perplexity of each sample."""
  log_likelihoods = np.asarray(log_likelihoods, np.float64)
  return np.exp(log_likelihoods / np.maximum(np.asarray(lengths), 1))


def mbr(candidates: Sequence[Sequence[np.ndarray]], utility: Utility) -> np.ndarray:
  """Minimum Bayes risk: index [B] maximising sum_j u(c_i, c_j) over the other samples j.

  The n samples are both the hypotheses and the Monte Carlo estimate of the model's distribution
  (sampling-based MBR). Ties go to the first sample.
  """
  index = []
  for row in candidates:
    n = len(row)
    gain = [sum(utility(row[i], row[j]) for j in range(n) if j != i) for i in range(n)]
    index.append(int(np.argmax(gain)))
  return np.asarray(index, np.int64)


def token_f1(candidate: np.ndarray, reference: np.ndarray) -> float:
  """Bag-of-tokens F1 between two token sequences (1 when both are empty): an MBR utility."""
  if len(candidate) == 0 and len(reference) == 0:
    return 1.0
  common = sum((Counter(np.asarray(candidate).tolist())
                & Counter(np.asarray(reference).tolist())).values())
  if common == 0:
    return 0.0
  precision, recall = common / len(candidate), common / len(reference)
  return 2 * precision * recall / (precision + recall)


def exact_match(candidate: np.ndarray, reference: np.ndarray) -> float:
  """1.0 if the sequences are equal, else 0.0: MBR with it is a majority vote over sequences."""
  return float(np.array_equal(candidate, reference))


def first_finish(tokens, lengths, eos_id: int) -> np.ndarray:
  """index [B] of the sample that emitted eos after the fewest tokens (ties: the first).

  A prompt none of whose samples emitted eos gets its shortest sample (the first, if all are
  equally long).
  """
  tokens, lengths = _check_samples(tokens, lengths)
  last = np.take_along_axis(tokens, np.maximum(lengths - 1, 0)[..., None], axis=2)[..., 0]
  finished = (lengths > 0) & (last == eos_id)
  key = np.where(finished, lengths, tokens.shape[2] + 1 + lengths)
  return np.argmin(key, axis=1)


def completions(tokens, lengths, eos_id: int | None = None) -> list[list[np.ndarray]]:
  """B lists of n 1-D token arrays: each sample up to its length, without a final eos."""
  tokens, lengths = _check_samples(tokens, lengths)
  out = []
  for b in range(tokens.shape[0]):
    row = []
    for i in range(tokens.shape[1]):
      seq = tokens[b, i, :lengths[b, i]]
      if eos_id is not None and len(seq) and seq[-1] == eos_id:
        seq = seq[:-1]
      row.append(seq)
    out.append(row)
  return out


@functools.partial(jax.jit, static_argnames=("model",))
def _log_likelihood(model: CausalModel, params, prompt, prompt_lengths, tokens, lengths):
  batch, n, steps = tokens.shape
  prompt_len = prompt.shape[1]
  rows = batch * n
  seq = jnp.zeros((rows, prompt_len + steps), jnp.int32)
  seq = seq.at[:, :prompt_len].set(jnp.repeat(prompt, n, axis=0))
  starts = jnp.repeat(prompt_lengths, n)
  slots = starts[:, None] + jnp.arange(steps)[None, :]
  seq = seq.at[jnp.arange(rows)[:, None], slots].set(tokens.reshape(rows, steps), mode="drop")
  logits, _ = prefill(model, params, seq, model.init_cache(rows, prompt_len + steps))
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  # generated token t of a row is predicted by the logits at slot start + t - 1
  before = jnp.take_along_axis(log_probs, (slots - 1)[..., None], axis=1)  # [R, N, V]
  token_lp = jnp.take_along_axis(before, tokens.reshape(rows, steps)[..., None], axis=2)[..., 0]
  valid = jnp.arange(steps)[None, :] < lengths.reshape(rows, 1)
  return jnp.sum(jnp.where(valid, token_lp, 0.0), axis=1).reshape(batch, n)


def log_likelihood(model: CausalModel, params: Any, prompt, prompt_lengths) -> Scorer:
  """A scorer: each sample's total log-probability under `model` (temperature 1) given its prompt.

  prompt [B, P] int32 and prompt_lengths [B] are the prompts the samples continue; the returned
  scorer maps (tokens [B, n, N], lengths [B, n]) to [B, n] float sums over each sample's tokens.
  Needs P + N <= model.max_len.
  """
  prompt = jnp.asarray(prompt, jnp.int32)
  prompt_lengths = jnp.asarray(prompt_lengths, jnp.int32)

  def scorer(tokens, lengths):
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.shape[0] != prompt.shape[0]:
      raise ValueError(f"{tokens.shape[0]} prompts of samples but {prompt.shape[0]} prompts given")
    if prompt.shape[1] + tokens.shape[2] > model.max_len:
      raise ValueError(f"prompt length {prompt.shape[1]} + sample length {tokens.shape[2]} "
                       f"exceeds the scoring model's max_len {model.max_len}")
    return np.asarray(_log_likelihood(model, params, prompt, prompt_lengths, tokens,
                                      jnp.asarray(lengths, jnp.int32)))

  return scorer

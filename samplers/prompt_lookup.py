"""Prompt lookup decoding: speculative decoding whose drafts are copied from the row's own text.

Saxena 2023 ("Prompt Lookup Decoding"); the n-gram matching of LLMA (Yang et al. 2023, "Inference
with Reference: Lossless Acceleration of Large Language Models"). No draft model: each round
takes the row's last n committed tokens (n from `max_ngram` down to `min_ngram`), finds their
most recent earlier occurrence in the prompt or the generated text, and drafts the gamma tokens
that followed it. The target scores the last token and the gamma drafts in one call, and the
speculative rule verifies them; a round where no row's text matches is a plain one-token step.

Guarantee: the draft is a deterministic function of the row's committed tokens, so its draft
distribution q is one-hot: a draft token x is accepted with probability p(x), and a rejection
draws from p with x removed, renormalised (`samplers.core.verify.single_draft` with one-hot q).
Every row's output therefore has exactly the target's sampling distribution at any temperature,
and greedy decoding equals greedy AR token for token (up to numerical near-ties between batched
and single-token target calls). It helps where text repeats: code, quoted passages, lists, and
the loops small models fall into.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from samplers.core import draft_verify, rng
from samplers.core.logits import SamplingParams
from samplers.core.protocol import (CausalModel, SampleOutput, check_max_new_tokens,
                                    check_num_draft_tokens, last_prompt_logits, prefill)
from samplers.spec import SamplerSpec


@dataclasses.dataclass(frozen=True)
class PromptLookupConfig:
  """Attributes:
    num_draft_tokens: gamma >= 1, tokens copied per round.
    max_ngram: the longest suffix matched (tried first).
    min_ngram: the shortest suffix matched, 1 <= min_ngram <= max_ngram.
    max_new_tokens: N, tokens generated per row at most.
    sampling: how tokens are drawn.
    eos_id: a row stops after emitting it; None never stops early.
    pad_id: fills `SampleOutput.tokens` after a row's end.
  """

  num_draft_tokens: int
  max_new_tokens: int
  max_ngram: int = 3
  min_ngram: int = 1
  sampling: SamplingParams = SamplingParams()
  eos_id: int | None = None
  pad_id: int = 0

  def __post_init__(self):
    check_num_draft_tokens(self.num_draft_tokens)
    if not 1 <= self.min_ngram <= self.max_ngram:
      raise ValueError(f"need 1 <= min_ngram <= max_ngram, got min_ngram={self.min_ngram}, "
                       f"max_ngram={self.max_ngram}")
    check_max_new_tokens(self.max_new_tokens)


def lookup(seq: jax.Array, context: jax.Array, gamma: int, max_ngram: int,
           min_ngram: int) -> tuple[jax.Array, jax.Array]:
  """Each row's draft: what followed the latest earlier occurrence of its last n tokens.

  For n = max_ngram down to min_ngram, the match is the largest start j with
  seq[j : j + n] == seq[c - n : c] and j + n < c (c = context: the match must be followed by at
  least one known token). The longest n with a match wins. The draft is seq[j + n + i] for
  i < gamma, read periodically (i modulo c - j - n) where it would run past c, so a repeating
  pattern is continued rather than read from unwritten slots.

  Args:
    seq: [B, S] int32 each row's tokens (valid below `context`).
    context: [B] int32 committed tokens per row, >= 2.
    gamma, max_ngram, min_ngram: static draft length and suffix lengths.
  Returns:
    (drafts [B, gamma] int32 — the last token repeated where nothing matched; matched [B] int32,
    the n that matched or 0).
  """
  batch, size = seq.shape
  starts = jnp.arange(size)[None, :]  # [1, S] candidate match starts j
  best = jnp.full((batch,), -1, jnp.int32)
  matched = jnp.zeros((batch,), jnp.int32)
  for n in range(max_ngram, min_ngram - 1, -1):
    ok = (starts + n < context[:, None]) & (context[:, None] >= n + 1)
    for k in range(n):
      suffix = jnp.take_along_axis(seq, jnp.clip(context - n + k, 0, size - 1)[:, None], axis=1)
      shifted = jnp.roll(seq, -k, axis=1)  # shifted[b, j] = seq[b, j + k] (j + k < c here)
      ok &= shifted == suffix
    found = jnp.max(jnp.where(ok, starts, -1), axis=1).astype(jnp.int32)
    take = (matched == 0) & (found >= 0)
    best = jnp.where(take, found + n, best)  # where the copied continuation starts
    matched = jnp.where(take, n, matched)
  period = jnp.maximum(context - best, 1)[:, None]
  source = best[:, None] + jnp.arange(gamma)[None, :] % period
  last = draft_verify.newest(seq, context)
  drafts = jnp.where(matched[:, None] > 0,
                     jnp.take_along_axis(seq, jnp.clip(source, 0, size - 1), axis=1), last)
  return drafts.astype(jnp.int32), matched


@functools.partial(jax.jit, static_argnames=("target", "config"))
def sample(target: CausalModel, target_params, prompt: jax.Array, prompt_lengths: jax.Array,
           key: jax.Array, config: PromptLookupConfig) -> SampleOutput:
  """Generates up to N tokens per row after right-padded prompts, drafting by n-gram lookup.

  Args:
    target: a hashable `CausalModel` (static); target_params: its parameters.
    prompt: [B, P] int32 right-padded; prompt_lengths: [B] int32 in [1, P].
    key: one key, or one per row (`rng.row_keys`). Position t is verified with
      `draft_verify.position_uniforms(keys, t, 1 + V)`; the first token uses the first V.
    config: static `PromptLookupConfig`.
  Returns:
    SampleOutput with tokens [B, N] and the statistics of `draft_verify.decode` without
    `draft_calls` (there is no draft model): `target_calls` = `model_calls`, `acceptance`
    (accepted / drafted tokens), `tokens_per_target_call`.
  Raises:
    ValueError: if P + N + gamma - 1 exceeds the target's max_len.
  """
  batch, prompt_len = prompt.shape
  gamma, vocab = config.num_draft_tokens, target.vocab_size
  slots = prompt_len + config.max_new_tokens + gamma - 1
  draft_verify.check_room({"target": target}, slots,
                          f"prompt length {prompt_len} + max_new_tokens {config.max_new_tokens} + "
                          f"num_draft_tokens {gamma} - 1", "max_new_tokens or num_draft_tokens")
  keys = rng.row_keys(key, batch)
  prompt_lengths = prompt_lengths.astype(jnp.int32)
  greedy = config.sampling.greedy

  def round_fn(cache, seq, context):
    """The target's cache holds all of the row's `context` tokens but the last. When no row's
    text has a match, the round is one AR step (a 1-token call instead of gamma + 1)."""
    drafts, matched = lookup(seq, context, gamma, config.max_ngram, config.min_ngram)
    window = context[:, None] - 1 + jnp.arange(gamma + 1)  # [B, gamma + 1] positions
    root = jnp.take_along_axis(seq, window[:, :1], axis=1)
    cache = cache.replace(lengths=context - 1)
    verify_u = None if greedy else draft_verify.position_uniforms(keys, window + 1, 1 + vocab)

    def verify_drafts(cache):
      logits, cache = target.apply(target_params, jnp.concatenate([root, drafts], axis=1),
                                   window, cache)
      q = None if greedy else jax.nn.one_hot(drafts, vocab, dtype=jnp.float32)
      emitted, count = draft_verify.verify_chain(drafts, q, logits, verify_u, config.sampling)
      return cache, emitted, count

    def step(cache):  # nothing to copy anywhere: emit one token from p_1
      logits, cache = target.apply(target_params, root, window[:, :1], cache)
      u = None if greedy else verify_u[:, 0, 1:]
      token = draft_verify.draw_draft(u, logits[:, 0], config.sampling)[0]
      return cache, jnp.broadcast_to(token[:, None], (batch, gamma + 1)), jnp.zeros_like(context)

    return jax.lax.cond(jnp.any(matched > 0), verify_drafts, step, cache)

  logits, cache = prefill(target, target_params, prompt, target.init_cache(batch, slots))
  out = draft_verify.decode(round_fn, cache, last_prompt_logits(logits, prompt_lengths), prompt,
                            prompt_lengths, keys, config)
  stats = {k: v for k, v in out.stats.items() if k != "draft_calls"}
  return out.replace(stats=stats)


@dataclasses.dataclass(frozen=True)
class PromptLookupOptions:
  """`sampler.*` settings of kind "prompt_lookup" (no second model).

  Attributes:
    num_draft_tokens: gamma, tokens copied from the row's text per target call.
    max_ngram: the longest suffix of the row matched against its earlier text.
    min_ngram: the shortest suffix tried when no longer one matches.
  """

  num_draft_tokens: int = 4
  max_ngram: int = 3
  min_ngram: int = 2


SPEC = SamplerSpec(
    "prompt_lookup", PromptLookupOptions, sample,
    lambda o, decode: PromptLookupConfig(o.num_draft_tokens, max_ngram=o.max_ngram,
                                         min_ngram=o.min_ngram, **decode.common()),
    slack=lambda o: o.num_draft_tokens)

"""Speculative sampling (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative
Decoding"; Chen et al. 2023, "Accelerating Large Language Model Decoding with Speculative
Sampling").

Each round, a small draft model proposes gamma tokens autoregressively from its KV cache; the
target scores the row's last emitted token and the gamma drafts in one call; draft i is accepted
with probability min(1, p_i / q_i) until the first rejection, where a token is drawn from
norm(max(0, p_i - q_i)); if all gamma are accepted a bonus token is drawn from p_{gamma+1}.
p and q are the target's and draft's distributions after the same temperature / top-k / top-p.

Guarantee: every row's output has exactly the distribution of sampling from the target alone
(`samplers.ar`). Greedy (temperature 0) makes p and q one-hot, so the output is the target's
greedy continuation, token for token (up to numerical near-ties between batched and single-token
target calls). Rows accept different numbers of drafts; both caches are rolled back per row by
moving their length pointers.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from samplers.core import draft_verify, rng
from samplers.core.logits import SamplingParams
from samplers.core.protocol import (CausalModel, SampleOutput, check_max_new_tokens,
                                    check_num_draft_tokens)
from samplers.spec import SamplerSpec


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
  """Attributes:
    num_draft_tokens: gamma >= 1, tokens the draft proposes per round.
    max_new_tokens: N, tokens generated per row at most.
    sampling: how tokens are drawn; applied identically to target and draft.
    eos_id: a row stops after emitting it; None never stops early.
    pad_id: fills `SampleOutput.tokens` after a row's end.
  """

  num_draft_tokens: int
  max_new_tokens: int
  sampling: SamplingParams = SamplingParams()
  eos_id: int | None = None
  pad_id: int = 0

  def __post_init__(self):
    check_num_draft_tokens(self.num_draft_tokens)
    check_max_new_tokens(self.max_new_tokens)



@functools.partial(jax.jit, static_argnames=("target", "draft", "config"))
def sample(target: CausalModel, target_params, draft: CausalModel, draft_params,
           prompt: jax.Array, prompt_lengths: jax.Array, key: jax.Array,
           config: SpeculativeConfig) -> SampleOutput:
  """Generates up to N tokens per row after right-padded prompts, with a draft model.

  Args:
    target, draft: hashable `CausalModel`s with the same vocabulary (static).
    target_params, draft_params: their parameters.
    prompt: [B, P] int32, row b's prompt is prompt[b, :prompt_lengths[b]]; the rest is padding.
    prompt_lengths: [B] int32, each in [1, P].
    key: one key, or one per row (see `rng.row_keys`). Position t of a row draws its draft token
      from the first V of its uniforms (`draft_verify.position_uniforms`), and is verified with
      the next 1 + V (`verify.single_draft`; a bonus token uses the last V).
    config: static `SpeculativeConfig`.
  Returns:
    SampleOutput with tokens [B, N] and the statistics of `draft_verify.decode`.
  Raises:
    ValueError: vocabularies differ, or P + N + gamma - 1 exceeds either model's max_len.
  """
  batch, prompt_len = prompt.shape
  gamma, vocab = config.num_draft_tokens, target.vocab_size
  slots = draft_verify.check_pair(target, draft, prompt_len, config)
  keys = rng.row_keys(key, batch)
  prompt_lengths = prompt_lengths.astype(jnp.int32)
  greedy = config.sampling.greedy

  def round_fn(caches, seq, context):
    """Cache invariant at a round's start: the target holds all of the row's `context` tokens
    but the last, the draft all but the last two (it re-reads the second-to-last, which it
    lacks after a round whose gamma drafts were all accepted)."""
    target_cache, draft_cache = caches
    window = context[:, None] - 1 + jnp.arange(gamma + 1)  # [B, gamma + 1] positions
    noise, verify_u = draft_verify.round_noise(keys, context, gamma, vocab, greedy)
    chain = draft_verify.draft_after(draft, draft_params, seq, context, draft_cache, noise, gamma,
                                     config.sampling)
    drafts, draft_cache = chain["drafts"], chain["cache"]
    scored = jnp.concatenate([jnp.take_along_axis(seq, window[:, :1], axis=1), drafts], axis=1)
    logits, target_cache = target.apply(target_params, scored, window,
                                        target_cache.replace(lengths=context - 1))
    emitted, count = draft_verify.verify_chain(drafts, chain["q"], logits, verify_u,
                                               config.sampling)
    return (target_cache, draft_cache), emitted, count

  return draft_verify.prefill_and_decode(round_fn, target, target_params, draft, draft_params,
                                         prompt, prompt_lengths, slots, keys, config)


@dataclasses.dataclass(frozen=True)
class SpeculativeOptions:
  """`sampler.*` settings of kind "speculative" (second model: the draft).

  Attributes:
    num_draft_tokens: gamma, tokens the draft proposes per target call.
  """

  num_draft_tokens: int = 4


SPEC = SamplerSpec(
    "speculative", SpeculativeOptions, sample,
    lambda o, decode: SpeculativeConfig(o.num_draft_tokens, **decode.common()),
    second_model="draft", slack=lambda o: o.num_draft_tokens)

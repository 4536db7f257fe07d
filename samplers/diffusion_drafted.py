"""Diffusion-drafted speculative decoding: a masked-diffusion model drafts a causal target's next
gamma tokens in one denoiser call, and the target verifies them in one call.

Each round masks everything after the row's committed tokens, asks the denoiser for the clean
token at the next gamma positions (its per-position marginals q_i given the prefix; SUBS, Sahoo
et al. 2024), draws draft i from q_i after the row's temperature / top-k / top-p, independently
of the other drafts, and verifies the chain with speculative sampling (Leviathan et al. 2023;
Chen et al. 2023): accept draft i with probability min(1, p_i(x_i) / q_i(x_i)) until the first
rejection, then draw from norm(max(0, p_i - q_i)); a bonus token from p_{gamma+1} when all pass.

Why this is exact. Speculative sampling is exact for any proposal, provided the q used to verify
draft i is the law draft i was drawn from given everything drawn before it. Here x_i is drawn
from the marginal q_i and independently of x_1..x_{i-1}, so its law given those drafts is q_i
itself: the rule needs the marginals, not the denoiser's joint. (Using anything else, e.g. the
denoiser's conditional given the earlier drafts, would be wrong unless the drafts were drawn from
it.) So every row's output has exactly the target's distribution at any temperature, and greedy
output equals greedy AR token for token. What the denoiser's quality changes is only how many
drafts pass. The denoiser has no cache here (it re-reads the prefix each round), so it pays when
it is much smaller than the target.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from samplers.core import draft_verify, rng
from samplers.core.logits import SamplingParams
from samplers.core.protocol import (SampleOutput, check_max_new_tokens, check_num_draft_tokens,
                                    check_vocabularies, last_prompt_logits, prefill)
from samplers.spec import SamplerSpec


@dataclasses.dataclass(frozen=True)
class DiffusionDraftedConfig:
  """Attributes:
    num_draft_tokens: gamma >= 1, tokens the denoiser drafts per round (one denoiser call).
    context_window: the denoiser sees the row's last `context_window` tokens before the masks,
      on a canvas of min(context_window + gamma, the denoiser's max_len) (0: the whole row, on
      a canvas as wide as the batch's). Any window keeps decoding exact (the drafts are still
      drawn from the marginals they are verified with); a short one makes the uncached
      denoiser call cheap, and with APD's mixture a window keeps a row's tokens independent of
      the batch's prompt width.
    max_new_tokens: N, tokens generated per row at most.
    sampling: how tokens are drawn; applied identically to the target and the marginals.
    eos_id: a row stops after emitting it; None never stops early.
    pad_id: fills `SampleOutput.tokens` after a row's end.
    mixture: R in [0, 1]. 0 (this sampler): drafts are verified against the target, exactly.
      R > 0 is APD (`samplers.apd`, lossy): they are verified against the multiplicative mixture
      p_D^R p_target^(1 - R) of their marginal and the target's conditional, renormalised.
  """

  num_draft_tokens: int
  max_new_tokens: int
  context_window: int = 0
  sampling: SamplingParams = SamplingParams()
  eos_id: int | None = None
  pad_id: int = 0
  mixture: float = 0.0

  def __post_init__(self):
    if not 0.0 <= self.mixture <= 1.0:
      raise ValueError(f"mixture (APD's R) must be in [0, 1], got {self.mixture}")
    check_num_draft_tokens(self.num_draft_tokens)
    if self.context_window < 0:
      raise ValueError(f"context_window must be >= 0 (0: the whole row), got "
                       f"{self.context_window}")
    check_max_new_tokens(self.max_new_tokens)


def _check(target, denoiser, prompt_len: int, config) -> int:
  """Cache slots per row (P + N + gamma - 1); ValueError if the pair cannot run it."""
  if not hasattr(denoiser, "denoise"):
    raise ValueError("sampler.kind=diffusion_drafted (and apd) drafts with a masked-diffusion "
                     "denoiser (model.kind=mdlm) as its second model; the second model given "
                     "has no `denoise`")
  check_vocabularies(target, denoiser, ("target", "denoiser"))
  gamma, steps = config.num_draft_tokens, config.max_new_tokens
  need = prompt_len + steps + gamma - 1  # the target's cache; the denoiser's canvas is need + 1
  formula = f"prompt length {prompt_len} + max_new_tokens {steps} + num_draft_tokens {gamma}"
  lower = "max_new_tokens or num_draft_tokens"
  draft_verify.check_room({"target": target}, need, f"{formula} - 1", lower)
  if config.context_window:  # the canvas: min(window + gamma, max_len), at least a token + gamma
    draft_verify.check_room({"denoiser": denoiser}, gamma + 1, f"num_draft_tokens {gamma} + 1",
                            "num_draft_tokens")
  else:
    draft_verify.check_room({"denoiser": denoiser}, need + 1, formula, lower)
  return need


@functools.partial(jax.jit, static_argnames=("target", "denoiser", "config"))
def sample(target, target_params, denoiser, denoiser_params, prompt: jax.Array,
           prompt_lengths: jax.Array, key: jax.Array,
           config: DiffusionDraftedConfig) -> SampleOutput:
  """Generates up to N tokens per row after right-padded prompts, drafted by a denoiser.

  Args:
    target: a hashable causal model (static); target_params: its parameters.
    denoiser: a hashable `samplers.core.denoiser_protocol.Denoiser` with the target's vocabulary
      (static); denoiser_params: its parameters.
    prompt: [B, P] int32 right-padded; prompt_lengths: [B] int32 in [1, P].
    key: one key, or one per row (`rng.row_keys`); randomness per position as in
      `samplers.speculative`.
    config: static `DiffusionDraftedConfig`.
  Returns:
    SampleOutput with tokens [B, N] and the statistics of `draft_verify.decode`; `draft_calls`
    counts denoiser calls (one per round, plus one for the prefill's place in the count).
  Raises:
    ValueError: the second model is not a denoiser, vocabularies differ, or P + N + gamma
      exceeds a model's max_len.
  """
  batch, prompt_len = prompt.shape
  gamma, vocab = config.num_draft_tokens, target.vocab_size
  slots = _check(target, denoiser, prompt_len, config)
  keys = rng.row_keys(key, batch)
  prompt_lengths = prompt_lengths.astype(jnp.int32)
  greedy = config.sampling.greedy
  draw = jax.vmap(draft_verify.draw_draft, in_axes=(1, 1, None), out_axes=1)

  def round_fn(cache, seq, context):
    """The target's cache holds all of the row's `context` tokens but the last."""
    # A window's canvas is always min(window + gamma, max_len) wide (a short row's masks run
    # past its drafts), so what a row's denoiser sees does not depend on the batch's width.
    width = (min(config.context_window + gamma, denoiser.max_len) if config.context_window
             else seq.shape[1])
    seq = jnp.pad(seq, ((0, 0), (0, max(0, width - seq.shape[1]))))
    start = jnp.clip(context + gamma - width, 0, seq.shape[1] - width)  # [B] the canvas's first
    index = start[:, None] + jnp.arange(width)[None, :]
    canvas = jnp.where(index < context[:, None], jnp.take_along_axis(seq, index, axis=1),
                       denoiser.mask_id)
    marginals = denoiser.denoise(denoiser_params, canvas)  # [B, width, V]
    window = context[:, None] - 1 + jnp.arange(gamma + 1)  # [B, gamma + 1] positions
    draft_logits = jnp.take_along_axis(marginals, (window[:, 1:] - start[:, None])[:, :, None],
                                       axis=1)  # [B, gamma, V]
    noise, verify_u = draft_verify.round_noise(keys, context, gamma, vocab, greedy)
    drafts, q = draw(noise, draft_logits, config.sampling)  # each from its own marginal
    scored = jnp.concatenate([jnp.take_along_axis(seq, window[:, :1], axis=1), drafts], axis=1)
    logits, cache = target.apply(target_params, scored, window, cache.replace(lengths=context - 1))
    if config.mixture:  # APD: the drafted positions' target is the mixture (the bonus: target)
      mixed = ((1.0 - config.mixture) * jax.nn.log_softmax(logits[:, :gamma], axis=-1)
               + config.mixture * jax.nn.log_softmax(draft_logits, axis=-1))
      logits = jnp.concatenate([mixed, logits[:, gamma:]], axis=1)
    emitted, count = draft_verify.verify_chain(drafts, q, logits, verify_u, config.sampling)
    return cache, emitted, count

  logits, cache = prefill(target, target_params, prompt, target.init_cache(batch, slots))
  out = draft_verify.decode(round_fn, cache, last_prompt_logits(logits, prompt_lengths), prompt,
                            prompt_lengths, keys, config)
  rounds = out.stats["target_calls"] - 1
  return out.replace(stats={**out.stats, "draft_calls": 1 + rounds})


@dataclasses.dataclass(frozen=True)
class DiffusionDraftedOptions:
  """`sampler.*` settings of kind "diffusion_drafted" (second model: a masked-diffusion
  denoiser with the target's vocabulary, `--set sampler.draft_workdir=<its run>`).

  Attributes:
    num_draft_tokens: gamma, tokens the denoiser drafts per round in one call.
    context_window: tokens of the row the denoiser sees before the masks (0: all of it).
  """

  num_draft_tokens: int = 4
  context_window: int = 32


SPEC = SamplerSpec(
    "diffusion_drafted", DiffusionDraftedOptions, sample,
    lambda o, decode: DiffusionDraftedConfig(o.num_draft_tokens, context_window=o.context_window,
                                             **decode.common()),
    second_model="denoiser", second_kind="denoiser", slack=lambda o: o.num_draft_tokens,
    windowed_second=lambda o: o.context_window > 0)

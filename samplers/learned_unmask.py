"""Learned parallel unmasking (Learn2PD) with the end-of-text stop, on a `FinalityDenoiser`.

Learn2PD (Bao et al. 2025, "Learning to Parallel: Accelerating Diffusion Large Language Models
via Learnable Parallel Decoding") replaces a hand-set confidence rule by a small filter head that
predicts, per masked position, whether the denoiser's current guess there is already *final*
(equal to the token one-at-a-time greedy decoding would end with). Each step here makes one
`denoise_with_finality` pass, proposes a candidate at every masked position (argmax, or a sample
at temperature > 0, as `samplers.unmask.propose`) and commits every masked position whose
finality probability sigmoid(f) is >= `finality_threshold`, plus always the single most
confident position by `confidence` (ties to the lower position), so every step makes progress.

End-of-text stop (the paper's EoTP): when `eos_id` is set, a row stops as soon as it has
committed an eos at a generated position with no mask before it; its remaining masks become
`pad_id` (no model call is spent on them) and later steps leave the row alone. The tokens after
that eos are padding, so text decoding, which ends at the first eos, loses nothing.

Guarantees (tested in tests/samplers/test_learned_unmask.py):
- committed tokens never change (only masked positions are ever written);
- no mask is left: each call commits >= 1 token per unfinished row, so a row with M masks needs
  at most M calls;
- `finality_threshold` 1.0 commits exactly one token per step, the most confident: the result
  equals `samplers.unmask` with rule "topk", k = 1 and the same confidence and key, token for
  token (the comparison is on the finality logit, so a saturated sigmoid never counts as 1);
- the eos stop changes nothing before the stop: a row's committed tokens equal those of the same
  run without the stop, and it stops with fewer calls whenever it pads a mask.
Below 1.0 the rule is a heuristic: a position the head calls final but whose guess would still
have changed is committed anyway, so the output can differ from one-at-a-time decoding; its
quality is measured (bench), not claimed.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from samplers.core import canvas as canvas_lib
from samplers import unmask
from samplers.core import rng
from samplers.core.denoiser_protocol import FinalityDenoiser
from samplers.core.logits import SamplingParams
from samplers.core.protocol import SampleOutput
from samplers.spec import SamplerSpec


@dataclasses.dataclass(frozen=True)
class LearnedUnmaskConfig:
  """Attributes:
    finality_threshold: tau in (0, 1]; a masked position is committed when its finality
      probability is >= tau (1.0: never by finality, one token per step).
    confidence: how the always-committed most confident position is chosen, one of
      `unmask.CONFIDENCES`.
    sampling: how candidates are drawn (temperature 0: argmax).
    eos_id: the end-of-text id that stops a row (None: no stop, every mask is filled).
    pad_id: what the stop writes into a stopped row's remaining masks.
  """

  finality_threshold: float = 0.9
  confidence: str = "max_prob"
  sampling: SamplingParams = SamplingParams(temperature=0.0)
  eos_id: int | None = None
  pad_id: int = 0

  def __post_init__(self):
    if not 0 < self.finality_threshold <= 1:
      raise ValueError(f"finality_threshold must be in (0, 1], got {self.finality_threshold}")
    if self.confidence not in unmask.CONFIDENCES:
      raise ValueError(f"confidence {self.confidence!r} is unknown; valid: "
                       f"{', '.join(unmask.CONFIDENCES)}")

  @property
  def top1(self) -> unmask.UnmaskConfig:
    """The one-most-confident-token rule every step includes."""
    return unmask.UnmaskConfig(rule="topk", k=1, confidence=self.confidence,
                               sampling=self.sampling)


def commit_mask(config: LearnedUnmaskConfig, finality: jax.Array, conf: jax.Array,
                eligible: jax.Array) -> jax.Array:
  """[B, L] bool: eligible positions with sigmoid(finality) >= tau, and the most confident one.

  Args:
    finality: [B, L] finality logits; conf: [B, L] candidate confidences; eligible: [B, L] bool.
  """
  chosen = unmask.commit_mask(config.top1, conf, eligible)
  tau = config.finality_threshold
  if tau < 1.0:  # compare logits: sigmoid(f) >= tau  <=>  f >= log(tau / (1 - tau))
    chosen |= eligible & (finality >= math.log(tau / (1.0 - tau)))
  return chosen


def eos_reached(tokens: jax.Array, generated: jax.Array, mask_id: int, eos_id: int) -> jax.Array:
  """[B] bool: the row holds eos at a generated position with no mask before it.

  Args:
    tokens: [B, L] int32 current canvas; generated: [B, L] bool, positions masked at the start.
  """
  index = jnp.arange(tokens.shape[1])[None, :]
  first_mask = jnp.min(jnp.where(tokens == mask_id, index, tokens.shape[1]), axis=1,
                       keepdims=True)
  return jnp.any(generated & (tokens == eos_id) & (index < first_mask), axis=1)


def check(model: FinalityDenoiser, canvas: jax.Array, config: LearnedUnmaskConfig) -> None:
  """ValueError when the model, canvas or ids do not fit together."""
  canvas_lib.check_model(model, canvas)
  if not hasattr(model, "denoise_with_finality"):
    raise ValueError("learned unmasking needs a FinalityDenoiser (a denoiser with a finality "
                     "head, model.kind=learn2pd)")
  for name, value in (("eos_id", config.eos_id), ("pad_id", config.pad_id)):
    if value is not None and value == model.mask_id:
      raise ValueError(f"{name}={value} is the model's mask id; use the tokenizer's {name[:3]}")


@functools.partial(jax.jit, static_argnames=("model", "config"))
def sample(model: FinalityDenoiser, params, canvas: jax.Array, key: jax.Array,
           config: LearnedUnmaskConfig) -> SampleOutput:
  """Fills the masks of `canvas` by learned parallel unmasking, stopping rows at eos.

  Args:
    model: a hashable `FinalityDenoiser` (static); params: its parameters.
    canvas: [B, L] int32; mask ids mark the positions to generate (`canvas.from_prompts`).
    key: one key or one per row (`rng.row_keys`); step s of a row uses fold_in(row_key, s), as
      in `samplers.unmask`.
    config: static `LearnedUnmaskConfig`.
  Returns:
    SampleOutput with tokens [B, L] (no mask left; a stopped row's unfilled masks are pad_id)
    and lengths [B] (tokens the model committed per row, pads of the stop excluded). Stats:
    `model_calls` (batched passes = steps), `generated_tokens` (sum of lengths),
    `tokens_per_call` (generated / (B * model_calls), as `samplers.unmask`), `row_model_calls`
    (passes summed over rows, each counted until it finished or stopped) and `eos_padded_tokens`
    (masks the stop filled with pad_id instead of a model call).
  """
  check(model, canvas, config)
  batch, length = canvas.shape
  keys = rng.row_keys(key, batch)
  shape = (length, model.vocab_size + 1)
  canvas = canvas.astype(jnp.int32)
  generated = canvas == model.mask_id

  def body(state):
    tokens, steps, row_calls, padded = state
    eligible = tokens == model.mask_id
    logits, finality = model.denoise_with_finality(params, tokens)
    candidates, conf = unmask.propose(config.top1, logits, model.mask_id,
                                      canvas_lib.step_uniforms(keys, steps, shape))
    tokens = jnp.where(commit_mask(config, finality, conf, eligible), candidates, tokens)
    row_calls += jnp.any(eligible, axis=1).astype(jnp.int32)
    if config.eos_id is not None:
      stop = eos_reached(tokens, generated, model.mask_id, config.eos_id)[:, None]
      left = stop & (tokens == model.mask_id)
      padded += jnp.sum(left, axis=1, dtype=jnp.int32)
      tokens = jnp.where(left, config.pad_id, tokens)
    return tokens, steps + 1, row_calls, padded

  zeros = jnp.zeros((batch,), jnp.int32)
  tokens, steps, row_calls, padded = jax.lax.while_loop(
      lambda s: jnp.any(s[0] == model.mask_id), body, (canvas, jnp.int32(0), zeros, zeros))
  lengths = jnp.sum(generated, axis=1, dtype=jnp.int32) - padded
  total = jnp.sum(lengths)
  stats = {"model_calls": steps, "generated_tokens": total,
           "tokens_per_call": total / jnp.maximum(batch * steps, 1).astype(jnp.float32),
           "row_model_calls": jnp.sum(row_calls), "eos_padded_tokens": jnp.sum(padded)}
  return SampleOutput(tokens=tokens, lengths=lengths, stats=stats)


@dataclasses.dataclass(frozen=True)
class LearnedUnmaskOptions:
  """`sampler.*` settings of kind "learned_unmask" (Learn2PD, a model.kind=learn2pd model).

  Attributes:
    finality_threshold: commit every masked position whose learned finality probability is
      >= it, and at least the most confident one by `confidence` (1.0: one token per step).
    confidence: one of `unmask.CONFIDENCES`.
    eos_stop: stop a row once it has committed eos with nothing masked before it; the rest of
      the row becomes padding without model calls.
  """

  finality_threshold: float = 0.9
  confidence: str = "max_prob"
  eos_stop: bool = True


SPEC = SamplerSpec(
    "learned_unmask", LearnedUnmaskOptions, sample,
    lambda o, decode: LearnedUnmaskConfig(o.finality_threshold, o.confidence, decode.sampling,
                                          decode.eos_id if o.eos_stop else None, decode.pad_id),
    model="finality")

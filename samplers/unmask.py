"""Confidence-based parallel unmasking of a masked-diffusion denoiser (LLaDA, Fast-dLLM).

Each step scores the canvas once, proposes a candidate token at every masked position (argmax,
or a sample at temperature > 0) with a confidence, and commits some of them; committed tokens
never change and the loop runs until no mask remains. Rules:

- "topk": the k most confident per step (NFE = ceil(masked / k) per row).
- "threshold": every confidence >= tau, and at least the most confident (Fast-dLLM, Wu et al.
  2025), so each step commits >= 1 token: NFE <= tokens generated.
- "factor": with confidences sorted c_(1) >= c_(2) >= ..., the first n while
  c_(n) >= 1 - f / (n + 1), at least one (Fast-dLLM's factor rule).
- "greedy_safe": every confidence >= 1 - 1/(N + 1), N the row's masked count, at least one.
  With greedy candidates and max-prob confidence the result equals sequential greedy decoding
  (one most-confident token per step), checked by enumeration in the tests.

Confidences: "max_prob" (the distribution's largest probability), "margin" (top-1 minus top-2),
"entropy" (minus the entropy), "sampled" (the probability of the sampled candidate: LLaDA's
low-confidence remasking), "random" (a fresh uniform: a random order), "left_to_right".
Guarantee of one token per step (k = 1) with a perfect denoiser: when the chosen position does
not depend on the sampled token ("max_prob", "margin", "entropy", "random", "left_to_right") the
output follows the joint exactly; "sampled" looks at the token and is biased (tests measure it);
k > 1 gives the product of the committed positions' conditionals, not the joint.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from samplers.core import canvas as canvas_lib
from samplers.core import refill, rng
from samplers.core.denoiser_protocol import Denoiser
from samplers.core.logits import SamplingParams, probs
from samplers.core.protocol import SampleOutput
from samplers.spec import Decode, SamplerSpec

RULES = ("topk", "threshold", "factor", "greedy_safe")
CONFIDENCES = ("max_prob", "margin", "entropy", "sampled", "random", "left_to_right")
_PROBABILITY_LIKE = ("max_prob", "margin", "sampled")


@dataclasses.dataclass(frozen=True)
class UnmaskConfig:
  """Attributes:
    rule: one of RULES.
    k: tokens committed per step by "topk".
    threshold: tau in (0, 1] of "threshold".
    factor: f > 0 of "factor".
    confidence: one of CONFIDENCES; the threshold rules need a probability ("max_prob", "margin"
      or "sampled"), "greedy_safe" needs "max_prob".
    sampling: how candidates are drawn (temperature 0: argmax).
    slots: rows per model call (continuous batching, `samplers.core.refill`): a finished row's slot
      takes the next waiting canvas, so calls follow each row's own count rather than the
      batch's slowest row. None: every row in one batch. Rows get the same tokens either way.
  """

  rule: str = "topk"
  k: int = 1
  threshold: float = 0.9
  factor: float = 1.0
  confidence: str = "max_prob"
  sampling: SamplingParams = SamplingParams(temperature=0.0)
  slots: int | None = None

  def __post_init__(self):
    if self.rule not in RULES:
      raise ValueError(f"unmasking rule {self.rule!r} is unknown; valid: {', '.join(RULES)}")
    if self.confidence not in CONFIDENCES:
      raise ValueError(f"confidence {self.confidence!r} is unknown; valid: "
                       f"{', '.join(CONFIDENCES)}")
    if self.k < 1:
      raise ValueError(f"k (tokens per step) must be >= 1, got {self.k}")
    if not 0 < self.threshold <= 1:
      raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
    if self.slots is not None and self.slots < 1:
      raise ValueError(f"slots (rows per model call) must be >= 1 or None (all rows), got "
                       f"{self.slots}")
    if self.factor <= 0:
      raise ValueError(f"factor must be > 0, got {self.factor}")
    if self.rule != "topk" and self.confidence not in _PROBABILITY_LIKE:
      raise ValueError(f"rule {self.rule!r} compares confidences with probabilities; use "
                       f"confidence {', '.join(_PROBABILITY_LIKE)} (got {self.confidence!r})")
    if self.rule == "greedy_safe" and self.confidence != "max_prob":
      raise ValueError(f"rule 'greedy_safe' needs confidence 'max_prob', got {self.confidence!r}")


def confidence(kind: str, dist: jax.Array, candidates: jax.Array, u: jax.Array) -> jax.Array:
  """[B, L] float32 confidence of each position's candidate.

  Args:
    dist: [B, L, V] the model's distributions; candidates: [B, L] int32; u: [B, L] uniforms (used
      by "random" only).
  """
  if kind == "max_prob":
    return jnp.max(dist, axis=-1)
  if kind == "margin":
    top2 = jax.lax.top_k(dist, 2)[0]
    return top2[..., 0] - top2[..., 1]
  if kind == "entropy":
    return jnp.sum(jnp.where(dist > 0, dist * jnp.log(jnp.where(dist > 0, dist, 1.0)), 0.0), -1)
  if kind == "sampled":
    return jnp.take_along_axis(dist, candidates[..., None], axis=-1)[..., 0]
  if kind == "random":
    return u
  return -jnp.broadcast_to(jnp.arange(dist.shape[1], dtype=jnp.float32), candidates.shape)


def commit_mask(config: UnmaskConfig, conf: jax.Array, eligible: jax.Array) -> jax.Array:
  """[B, L] bool: the eligible positions the rule commits (at least one per row with any).

  Ties in confidence go to the lower position.
  """
  scores = jnp.where(eligible, conf, -jnp.inf)
  rank = jnp.argsort(jnp.argsort(-scores, axis=-1, stable=True), axis=-1, stable=True)
  if config.rule == "topk":
    chosen = rank < config.k
  elif config.rule == "threshold":
    chosen = scores >= config.threshold
  elif config.rule == "factor":
    chosen = scores >= 1.0 - config.factor / (rank + 2.0)
  else:
    remaining = jnp.sum(eligible, axis=-1, keepdims=True)
    chosen = scores >= 1.0 - 1.0 / (remaining + 1.0)
  return eligible & (chosen | (rank == 0))


def propose(config: UnmaskConfig, logits: jax.Array, mask_id: int,
            u: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(candidates [B, L] int32, confidences [B, L]) from denoiser logits [B, L, V] and uniforms
  u [B, L, V + 1] (V for the candidate draw, one for a "random" confidence).

  Candidates come from the sampling distribution (argmax when greedy); confidences from the
  model's own distribution softmax(logits), so they stay informative when decoding greedily.
  """
  logits = logits.astype(jnp.float32).at[..., mask_id].set(-jnp.inf)
  candidates = canvas_lib.draw_tokens(u[..., :-1], probs(logits, config.sampling),
                                      config.sampling)
  model_dist = jax.nn.softmax(logits, axis=-1)
  return candidates, confidence(config.confidence, model_dist, candidates, u[..., -1])


def step(config: UnmaskConfig, logits: jax.Array, tokens: jax.Array, eligible: jax.Array,
         mask_id: int, u: jax.Array) -> jax.Array:
  """One unmasking step: tokens [B, L] with the committed candidates among `eligible` filled."""
  candidates, conf = propose(config, logits, mask_id, u)
  return jnp.where(commit_mask(config, conf, eligible), candidates, tokens)


@functools.partial(jax.jit, static_argnames=("model", "config"))
def sample(model: Denoiser, params, canvas: jax.Array, key: jax.Array,
           config: UnmaskConfig) -> SampleOutput:
  """Fills every mask of `canvas` by confidence-based parallel unmasking.

  Args:
    model: a hashable `Denoiser` (static); params: its parameters.
    canvas: [B, L] int32; mask ids mark the positions to generate (`canvas.from_prompts`).
    key: one key or one per row (`rng.row_keys`); step s of a row uses fold_in(row_key, s).
    config: static `UnmaskConfig`.
  Returns:
    SampleOutput with tokens [B, L] (the completed canvas, no mask left), lengths [B] (masks
    filled per row); stats `model_calls` (calls of the batch: the steps, or with `slots` the
    passes over them), `rows_per_call` (B, or the slots), `generated_tokens`, `tokens_per_call`
    (generated / (rows_per_call * model_calls)) and `row_model_calls` (calls summed over rows,
    each row counted until its last mask is filled: what decoding each row alone, at batch 1,
    would cost).
  """
  canvas_lib.check_model(model, canvas)
  batch, length = canvas.shape
  slots = min(config.slots or batch, batch)

  def one_call(tokens, eligible, u):
    return step(config, model.denoise(params, tokens), tokens, eligible, model.mask_id, u)

  tokens, calls, row_calls = refill.decode(canvas.astype(jnp.int32), rng.row_keys(key, batch),
                                           slots, model.mask_id, one_call,
                                           (length, model.vocab_size + 1))
  return canvas_lib.output(canvas, tokens, model.mask_id, calls, rows_per_call=slots,
                           row_model_calls=row_calls)


@dataclasses.dataclass(frozen=True)
class UnmaskOptions:
  """`sampler.*` settings of kind "unmask" (a masked-diffusion model), those of UnmaskConfig.

  Attributes:
    rule: one of RULES: "topk" (k per step), "threshold" (confidence >= threshold, at least
      one), "factor" (Fast-dLLM's factor rule) or "greedy_safe" (threshold 1 - 1/(N + 1): equals
      one-token-at-a-time greedy).
    confidence: one of CONFIDENCES.
    k, threshold, factor: the rules' parameters.
    slots: prompts per model call with continuous batching (a finished row's slot takes the next
      prompt; `samplers.core.refill`); 0: all prompts in one batch.
  """

  rule: str = "threshold"
  confidence: str = "max_prob"
  k: int = 1
  threshold: float = 0.9
  factor: float = 1.0
  slots: int = 0


def rule_of(options, decode: Decode, slots: int | None = None) -> UnmaskConfig:
  """The UnmaskConfig of options carrying the rule fields (unmask's and block's)."""
  return UnmaskConfig(rule=options.rule, k=options.k, threshold=options.threshold,
                      factor=options.factor, confidence=options.confidence,
                      sampling=decode.sampling, slots=slots)


def _build(options: UnmaskOptions, decode: Decode) -> UnmaskConfig:
  if options.slots < 0:
    raise ValueError(f"slots must be >= 1, or 0 for all prompts at once; got {options.slots}")
  return rule_of(options, decode, options.slots or None)


SPEC = SamplerSpec("unmask", UnmaskOptions, sample, _build, model="denoiser")

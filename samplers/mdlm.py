"""Ancestral sampling of a masked diffusion LM with a fixed number of steps (MDLM, Sahoo et al.
2024), and the masking schedules it steps through.

Times t_k = 1 - k / S, k = 0..S. The step t -> s unmasks each still-masked position
independently with probability (alpha_s - alpha_t) / (1 - alpha_t), its token drawn from the
denoiser's p(. | z_t); unmasked tokens never change, and the last step (alpha_0 = 1) unmasks
everything left. The denoiser is not conditioned on t, so when a step changes no token the next
step reuses its output: the loop calls the model under `lax.cond` and counts the calls it spends
(`model_calls` <= S, and <= 1 + the number of steps that changed the canvas). That saving needs
one decision for the whole batch: under `jax.vmap` over keys (e.g. `samplers.repeated`) each
sample decides alone, `lax.cond` becomes a select that runs the denoiser at every step, and
`model_calls` then reports the S calls that ran (`samplers.core.cond_calls`).

Guarantee: each step is the exact reverse transition of the factorised model; with a perfect
denoiser the output distribution is `ancestral_joint` of the tests (positions unmasked in the same
step are drawn independently, so it approaches the joint as S grows, not before).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from samplers.core import canvas as canvas_lib
from samplers.core import cond_calls, rng
from samplers.core.denoiser_protocol import Denoiser
from samplers.core.logits import SamplingParams, probs
from samplers.core.protocol import SampleOutput
from samplers.spec import Decode, SamplerSpec

SCHEDULES = ("loglinear", "cosine")


def alpha(schedule: str, t: jax.Array) -> jax.Array:
  """alpha_t, the probability that a token is still clean at time t in [0, 1]:
  1 - t ("loglinear") or cos(pi t / 2) ("cosine"); alpha_0 = 1, alpha_1 = 0."""
  if schedule == "loglinear":
    return 1.0 - t
  return jnp.cos(0.5 * jnp.pi * t)


def unmask_probability(schedule: str, step: jax.Array, steps: int) -> jax.Array:
  """(alpha_s - alpha_t) / (1 - alpha_t) for step `step` of `steps` (t = 1 - k/S, s = t - 1/S);
  1 at the last step."""
  t = 1.0 - step.astype(jnp.float32) / steps
  s = t - 1.0 / steps
  a_t, a_s = alpha(schedule, t), alpha(schedule, jnp.maximum(s, 0.0))
  return jnp.where(step >= steps - 1, 1.0, (a_s - a_t) / (1.0 - a_t))


@dataclasses.dataclass(frozen=True)
class AncestralConfig:
  """Attributes:
    steps: S >= 1 denoising steps (at most the canvas length).
    schedule: one of SCHEDULES.
    sampling: how tokens are drawn from the denoiser.
  """

  steps: int
  schedule: str = "loglinear"
  sampling: SamplingParams = SamplingParams()

  def __post_init__(self):
    if self.steps < 1:
      raise ValueError(f"steps must be >= 1, got {self.steps}")
    if self.schedule not in SCHEDULES:
      raise ValueError(f"schedule {self.schedule!r} is unknown; valid: {', '.join(SCHEDULES)}")


def masked_logits(model: Denoiser, params, tokens: jax.Array) -> jax.Array:
  """The denoiser's float32 logits [B, L, V] with the mask id excluded."""
  return model.denoise(params, tokens).astype(jnp.float32).at[..., model.mask_id].set(-jnp.inf)


@functools.partial(jax.jit, static_argnames=("model", "config"))
def sample(model: Denoiser, params, canvas: jax.Array, key: jax.Array,
           config: AncestralConfig) -> SampleOutput:
  """Fills every mask of `canvas` [B, L] by S ancestral steps.

  Args:
    model: a hashable `Denoiser` (static); params: its parameters.
    canvas: [B, L] int32 with mask ids where tokens are generated.
    key: one key or one per row; step k of a row uses fold_in(row_key, k).
    config: static `AncestralConfig`.
  Returns:
    SampleOutput with the completed canvas [B, L]; stats `model_calls` (denoiser calls that ran:
    those not skipped, or S under a `jax.vmap` that batches the skip decision, where both
    branches run), `generated_tokens`, `tokens_per_call`, `steps`.
  Raises:
    ValueError: if S exceeds the canvas length.
  """
  canvas_lib.check_model(model, canvas)
  batch, length = canvas.shape
  if config.steps > length:
    raise ValueError(f"steps={config.steps} exceeds the {length} canvas positions; use at most "
                     f"one step per generated token")
  keys = rng.row_keys(key, batch)
  canvas = canvas.astype(jnp.int32)
  vocab = model.vocab_size

  def body(state, step):
    tokens, logits, changed, calls = state
    logits = jax.lax.cond(changed, lambda: masked_logits(model, params, tokens), lambda: logits)
    calls = calls + cond_calls.branch_ran(changed).astype(jnp.int32)
    u = canvas_lib.step_uniforms(keys, step, (length, vocab + 1))
    drawn = canvas_lib.draw_tokens(u[..., 1:], probs(logits, config.sampling), config.sampling)
    unmask = (tokens == model.mask_id) & (
        u[..., 0] < unmask_probability(config.schedule, step, config.steps))
    return (jnp.where(unmask, drawn, tokens), logits, jnp.any(unmask), calls), None

  logits = jnp.zeros((batch, length, vocab), jnp.float32)
  state = (canvas, logits, jnp.bool_(True), jnp.int32(0))
  (tokens, _, _, calls), _ = jax.lax.scan(body, state, jnp.arange(config.steps))
  return canvas_lib.output(canvas, tokens, model.mask_id, calls, steps=jnp.int32(config.steps))


@dataclasses.dataclass(frozen=True)
class AncestralOptions:
  """`sampler.*` settings of kind "mdlm" (a masked-diffusion model).

  Attributes:
    steps: S, denoising steps (1 <= S <= tokens generated).
    schedule: one of SCHEDULES.
  """

  steps: int = 32
  schedule: str = "loglinear"


def check_steps(steps: int, decode: Decode) -> None:
  """ValueError when there are more denoising steps than tokens to generate."""
  if steps > decode.max_new_tokens:
    raise ValueError(f"steps={steps} exceeds the {decode.max_new_tokens} tokens generated; use "
                     f"at most one step per token")


def _build(options: AncestralOptions, decode: Decode) -> AncestralConfig:
  check_steps(options.steps, decode)
  return AncestralConfig(options.steps, options.schedule, decode.sampling)


SPEC = SamplerSpec("mdlm", AncestralOptions, sample, _build, model="denoiser")

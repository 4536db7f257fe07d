"""Energy-based correction of masked diffusion by parallel importance sampling (EDLM, Xu et al.
2025, "Energy-Based Diffusion Language Models for Text Generation").

Each ancestral step (`samplers.mdlm`) from z_t draws K candidate clean canvases in parallel from
the factorised denoiser q(x) = prod_i p_theta(x_i | z_t) (masked positions only), weights them by
w_j = p_AR(x^(j)) / q(x^(j)), where an autoregressive model (any `samplers.core.protocol.CausalModel`,
all K candidates scored in one cache-free causal pass) supplies the sequence energy, resamples
one candidate by w and uses it as the clean prediction of the step to z_s.

Guarantee (self-normalised importance sampling): with one step (every position unmasked from the
resampled candidate) the output tends to the AR model's distribution over the masked positions
as K grows, and K = 1 is plain ancestral sampling; the tests measure the total-variation distance
to the AR target shrinking with K. The AR model scores positions 1..L-1 given position 0, so the
canvas should start with a visible token (the prompt's start token).

Batch independence: with `pad_id` (the decode's pad id; `canvas.from_prompts` fills a row past
its prompt and generation with it) a row's trailing pad_id positions are padding and left out of
its energy, and every position draws its own uniforms (`canvas.position_uniforms`), so a row
padded to a batch's longer canvas gets the tokens it gets alone: tested with a denoiser that
ignores the padding (a bidirectional denoiser sees it, which is the model's own dependence).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from samplers.core import canvas as canvas_lib
from samplers import mdlm
from samplers.core import rng
from samplers.core.denoiser_protocol import Denoiser
from samplers.core.logits import SamplingParams, probs
from samplers.core.protocol import CausalModel, SampleOutput, check_vocabularies, prefill_method
from samplers.spec import Decode, SamplerSpec


@dataclasses.dataclass(frozen=True)
class EDLMConfig:
  """Attributes:
    steps: S >= 1 ancestral steps.
    num_candidates: K >= 1 candidates per step.
    schedule: one of `mdlm.SCHEDULES`.
    sampling: how candidate tokens are drawn from the denoiser (q is that distribution).
    pad_id: the id of the padding after a row (its trailing run of pad_id is not scored by the
      energy model), or None: every position is the row's (a canvas without padding).
  """

  steps: int
  num_candidates: int = 4
  schedule: str = "loglinear"
  sampling: SamplingParams = SamplingParams()
  pad_id: int | None = None

  def __post_init__(self):
    mdlm.AncestralConfig(self.steps, self.schedule, self.sampling)  # same checks
    if self.num_candidates < 1:
      raise ValueError(f"num_candidates must be >= 1, got {self.num_candidates}")


def sequence_log_probs(model: CausalModel, params, tokens: jax.Array,
                       scored: jax.Array | None = None) -> jax.Array:
  """[B] sum over t >= 1 of log p(x_t | x_<t) of sequences [B, L] in one causal pass, over the
  positions t where scored [B, L] bool is true (default: all)."""
  batch, length = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
  logits, _ = prefill_method(model)(params, tokens, positions, model.init_cache(batch, length))
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  taken = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
  if scored is not None:
    taken = jnp.where(scored[:, 1:], taken, 0.0)
  return jnp.sum(taken, axis=-1)


@functools.partial(jax.jit, static_argnames=("model", "energy", "config"))
def sample(model: Denoiser, params, energy: CausalModel, energy_params, canvas: jax.Array,
           key: jax.Array, config: EDLMConfig) -> SampleOutput:
  """Fills every mask of `canvas` [B, L] by S importance-resampled ancestral steps.

  Args:
    model: a hashable `Denoiser` (static); params: its parameters.
    energy: a hashable `CausalModel` over the same vocabulary (static); energy_params: its
      parameters.
    canvas: [B, L] int32 with mask ids where tokens are generated; position 0 visible.
    key: one key or one per row; step k of a row uses fold_in(row_key, k) (position i:
      fold_in(fold_in(row_key, k), i)) and fold_in(row_key, S + k).
    config: static `EDLMConfig`.
  Returns:
    SampleOutput with the completed canvas; stats `model_calls` (denoiser calls = S),
    `energy_calls` (AR passes over B * K candidates = S), `generated_tokens`, `tokens_per_call`,
    `effective_candidates` (mean 1 / sum w^2 of the normalised weights).
  Raises:
    ValueError: if the vocabularies differ, S exceeds L, or L exceeds a model's max_len.
  """
  canvas_lib.check_model(model, canvas)
  canvas_lib.check_model(energy, canvas)
  check_vocabularies(model, energy, ("denoiser", "energy model"))
  batch, length = canvas.shape
  if config.steps > length:
    raise ValueError(f"steps={config.steps} exceeds the {length} canvas positions")
  count, vocab = config.num_candidates, model.vocab_size
  keys = rng.row_keys(key, batch)
  canvas = canvas.astype(jnp.int32)
  scored = None  # every position
  if config.pad_id is not None:  # each row's own positions: up to its last one not padding
    index = jnp.arange(length)
    end = jnp.max(jnp.where(canvas != config.pad_id, index + 1, 0), axis=1)
    scored = jnp.repeat(index[None, :] < end[:, None], count, axis=0)  # [B * K, L]

  def body(state, step):
    tokens, spread = state
    q = probs(mdlm.masked_logits(model, params, tokens), config.sampling)  # [B, L, V]
    u = canvas_lib.position_uniforms(keys, step, length, (count + 1, vocab))  # [B, L, K + 1, V]
    masked = tokens == model.mask_id
    drawn = jax.vmap(lambda uu: canvas_lib.draw_tokens(uu, q, config.sampling), in_axes=2,
                     out_axes=1)(u[:, :, :count])  # [B, K, L]
    candidates = jnp.where(masked[:, None], drawn, tokens[:, None])
    q_taken = jnp.take_along_axis(q[:, None], candidates[..., None], axis=-1)[..., 0]
    log_q = jnp.sum(jnp.where(masked[:, None], jnp.log(q_taken), 0.0), axis=-1)  # [B, K]
    log_p = sequence_log_probs(energy, energy_params, candidates.reshape(batch * count, length),
                               scored)
    log_w = log_p.reshape(batch, count) - log_q
    gumbel = -jnp.log(-jnp.log(canvas_lib.step_uniforms(keys, step + config.steps, (count,))))
    choice = jnp.argmax(log_w + gumbel, axis=-1)
    clean = jnp.take_along_axis(candidates, choice[:, None, None], axis=1)[:, 0]
    unmask = masked & (u[:, :, count, 0] < mdlm.unmask_probability(config.schedule, step,
                                                                   config.steps))
    weights = jax.nn.softmax(log_w, axis=-1)
    return (jnp.where(unmask, clean, tokens), spread + jnp.mean(1.0 / jnp.sum(weights**2, -1))), None

  (tokens, spread), _ = jax.lax.scan(body, (canvas, jnp.float32(0)), jnp.arange(config.steps))
  steps = jnp.int32(config.steps)
  return canvas_lib.output(canvas, tokens, model.mask_id, steps, energy_calls=steps,
                           effective_candidates=spread / config.steps)


@dataclasses.dataclass(frozen=True)
class EDLMOptions:
  """`sampler.*` settings of kind "edlm" (a masked-diffusion model; second model: the causal
  energy model, sampler.draft_workdir).

  Attributes:
    steps: S, denoising steps (1 <= S <= tokens generated).
    num_candidates: K, candidates per step.
    schedule: one of `mdlm.SCHEDULES`.
  """

  steps: int = 32
  num_candidates: int = 4
  schedule: str = "loglinear"


def _build(options: EDLMOptions, decode: Decode) -> EDLMConfig:
  mdlm.check_steps(options.steps, decode)
  return EDLMConfig(options.steps, options.num_candidates, options.schedule, decode.sampling,
                    decode.pad_id)


SPEC = SamplerSpec("edlm", EDLMOptions, sample, _build, model="denoiser", second_model="energy")

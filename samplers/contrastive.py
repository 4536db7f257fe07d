"""Contrastive decoding (Li et al. 2023, "Contrastive Decoding: Open-ended Text Generation as
Optimization"): an expert and an amateur model with one vocabulary.

At each step, within the expert's plausible set V_head = {x : p_e(x) >= alpha * max_w p_e(w)},
tokens are scored by log p_e(x) - log p_a(x) (p_a at `amateur_temperature`); tokens outside
V_head get -inf. Greedy (temperature 0) takes the argmax of that score, as in the paper; a
temperature > 0 samples from softmax(score / temperature) restricted to V_head (top-k / top-p are
applied to the score as usual).

Guarantee: the plausible set always contains the expert's argmax, so a step never leaves it. With
a uniform amateur the score is log p_e up to a constant, so greedy contrastive decoding is the
expert's greedy continuation token for token, and sampling draws from p_e renormalised to V_head.
Both models run one call per token on their own KV caches (an AR loop over two models).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from samplers.core import emit, rng
from samplers.core.logits import SamplingParams, sample_token
from samplers.core.protocol import (CausalModel, SampleOutput, check_max_new_tokens,
                               check_vocabularies, last_prompt_logits, prefill)
from samplers.spec import SamplerSpec


@dataclasses.dataclass(frozen=True)
class ContrastiveConfig:
  """Attributes:
    max_new_tokens: N, tokens generated per row at most.
    alpha: plausibility cut-off in (0, 1]: keep tokens with p_e >= alpha * max p_e (paper: 0.1).
    amateur_temperature: temperature of the amateur's log-probabilities (> 0; paper: 0.5-1).
    sampling: how a token is drawn from the contrastive score (temperature 0 = greedy argmax).
    eos_id, pad_id: as in `ar.ARConfig`.
  """

  max_new_tokens: int
  alpha: float = 0.1
  amateur_temperature: float = 1.0
  sampling: SamplingParams = SamplingParams(temperature=0.0)
  eos_id: int | None = None
  pad_id: int = 0

  def __post_init__(self):
    check_max_new_tokens(self.max_new_tokens)
    if not 0 < self.alpha <= 1:
      raise ValueError(f"alpha must be in (0, 1], got {self.alpha}")
    if self.amateur_temperature <= 0:
      raise ValueError(f"amateur_temperature must be > 0, got {self.amateur_temperature}")


def contrastive_scores(expert_logits: jax.Array, amateur_logits: jax.Array, alpha: float,
                       amateur_temperature: float = 1.0) -> jax.Array:
  """[..., V] float32: log p_e - log p_a on the expert's plausible set, -inf elsewhere."""
  expert = jax.nn.log_softmax(expert_logits.astype(jnp.float32), axis=-1)
  amateur = jax.nn.log_softmax(amateur_logits.astype(jnp.float32) / amateur_temperature, axis=-1)
  plausible = expert >= jnp.log(alpha) + jnp.max(expert, axis=-1, keepdims=True)
  return jnp.where(plausible, expert - amateur, -jnp.inf)


@functools.partial(jax.jit, static_argnames=("expert", "amateur", "config"))
def sample(expert: CausalModel, expert_params, amateur: CausalModel, amateur_params,
           prompt: jax.Array, prompt_lengths: jax.Array, key: jax.Array,
           config: ContrastiveConfig) -> SampleOutput:
  """Generates up to N tokens per row by contrastive decoding.

  Args:
    expert, amateur: hashable `CausalModel`s with the same vocabulary (static).
    expert_params, amateur_params: their parameters.
    prompt: [B, P] int32 right-padded prompts; prompt_lengths: [B] int32, each in [1, P].
    key: one key or one per row; the token at absolute position t of a row uses
      fold_in(row_key, t) (as `ar.sample`).
    config: static `ContrastiveConfig`.
  Returns:
    SampleOutput with tokens [B, N]; stats `model_calls` (expert calls, prefill included),
    `expert_calls`, `amateur_calls`, `generated_tokens`.
  Raises:
    ValueError: vocabularies differ, or P + N exceeds either model's max_len.
  """
  check_vocabularies(expert, amateur, ("expert", "amateur"))
  batch, prompt_len = prompt.shape
  steps = config.max_new_tokens
  for name, model in (("expert", expert), ("amateur", amateur)):
    if prompt_len + steps > model.max_len:
      raise ValueError(f"prompt length {prompt_len} + max_new_tokens {steps} exceeds the {name}'s "
                       f"max_len {model.max_len}")
  keys = rng.row_keys(key, batch)
  prompt_lengths = prompt_lengths.astype(jnp.int32)

  def draw(expert_logits, amateur_logits, step, done, lengths):
    """Emits the token at generated index `step` (see `emit.token`): (token, done, lengths)."""
    scores = contrastive_scores(expert_logits, amateur_logits, config.alpha,
                                config.amateur_temperature)
    position_keys = rng.position_keys(keys, prompt_lengths + step)
    token = jax.vmap(sample_token, in_axes=(0, 0, None))(position_keys, scores, config.sampling)
    return emit.token(token, done, lengths, config.eos_id, config.pad_id)

  def start(model, params):
    logits, cache = prefill(model, params, prompt, model.init_cache(batch, prompt_len + steps))
    return last_prompt_logits(logits, prompt_lengths), cache.replace(lengths=prompt_lengths)

  expert_last, expert_cache = start(expert, expert_params)
  amateur_last, amateur_cache = start(amateur, amateur_params)
  token, done, lengths = draw(expert_last, amateur_last, 0, jnp.zeros((batch,), bool),
                              jnp.zeros((batch,), jnp.int32))
  state = dict(step=jnp.int32(1), tokens=jnp.full((batch, steps), config.pad_id,
                                                  jnp.int32).at[:, 0].set(token),
               done=done, lengths=lengths, caches=(expert_cache, amateur_cache))

  def body(s):
    step = s["step"]
    previous = jax.lax.dynamic_slice_in_dim(s["tokens"], step - 1, 1, axis=1)
    positions = (prompt_lengths + step - 1)[:, None]
    expert_logits, expert_cache = expert.apply(expert_params, previous, positions, s["caches"][0])
    amateur_logits, amateur_cache = amateur.apply(amateur_params, previous, positions,
                                                  s["caches"][1])
    token, done, lengths = draw(expert_logits[:, 0], amateur_logits[:, 0], step, s["done"],
                                s["lengths"])
    return dict(step=step + 1, tokens=s["tokens"].at[:, step].set(token), done=done,
                lengths=lengths, caches=(expert_cache, amateur_cache))

  s = jax.lax.while_loop(lambda s: (s["step"] < steps) & ~jnp.all(s["done"]), body, state)
  calls = s["step"]  # the prefill, then one call per further token
  stats = {"model_calls": calls, "expert_calls": calls, "amateur_calls": calls,
           "generated_tokens": jnp.sum(s["lengths"])}
  return SampleOutput(tokens=s["tokens"], lengths=s["lengths"], stats=stats)


@dataclasses.dataclass(frozen=True)
class ContrastiveOptions:
  """`sampler.*` settings of kind "contrastive" (this model is the expert, the second model the
  amateur).

  Attributes:
    alpha: the plausibility cut-off in (0, 1].
    amateur_temperature: > 0, the amateur's temperature.
  """

  alpha: float = 0.1
  amateur_temperature: float = 1.0


SPEC = SamplerSpec(
    "contrastive", ContrastiveOptions, sample,
    lambda o, decode: ContrastiveConfig(alpha=o.alpha, amateur_temperature=o.amateur_temperature,
                                        **decode.common()),
    second_model="amateur")

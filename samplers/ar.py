"""Autoregressive sampling with a KV cache: one prefill call, then one token per row per step.

The whole decode is one jitted program: a batched prefill of the right-padded prompts, then a
`lax.while_loop` that stops as soon as every row has emitted eos or `max_new_tokens`. It is the
reference that parallel decoders are compared against (tokens and speed).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from samplers.core import emit, rng
from samplers.core.logits import SamplingParams, sample_token
from samplers.core.protocol import (CausalModel, SampleOutput, check_max_new_tokens,
                               last_prompt_logits, prefill)
from samplers.spec import SamplerSpec


@dataclasses.dataclass(frozen=True)
class ARConfig:
  """Attributes:
    max_new_tokens: N, tokens generated per row at most.
    sampling: how each token is drawn.
    eos_id: a row stops after emitting it; None never stops early.
    pad_id: fills `SampleOutput.tokens` after a row's end.
  """

  max_new_tokens: int
  sampling: SamplingParams = SamplingParams()
  eos_id: int | None = None
  pad_id: int = 0

  def __post_init__(self):
    check_max_new_tokens(self.max_new_tokens)


@functools.partial(jax.jit, static_argnames=("model", "config"))
def sample(model: CausalModel, params, prompt: jax.Array, prompt_lengths: jax.Array,
           key: jax.Array, config: ARConfig) -> SampleOutput:
  """Generates up to N tokens per row after right-padded prompts.

  Args:
    model: any hashable `CausalModel` (static).
    params: its parameters.
    prompt: [B, P] int32, row b's prompt is prompt[b, :prompt_lengths[b]]; the rest is padding.
    prompt_lengths: [B] int32, each in [1, P].
    key: one key, or one per row (see `rng.row_keys`); the token at absolute position t of a row
      is drawn with fold_in(row_key, t).
    config: static `ARConfig`.
  Returns:
    SampleOutput with tokens [B, N]; stats `model_calls` and `generated_tokens`.
  Raises:
    ValueError: if P + N exceeds model.max_len.
  """
  batch, prompt_len = prompt.shape
  steps = config.max_new_tokens
  if prompt_len + steps > model.max_len:
    raise ValueError(
        f"prompt length {prompt_len} + max_new_tokens {steps} = {prompt_len + steps} exceeds the "
        f"model's max_len {model.max_len}; shorten the prompt or lower max_new_tokens")
  keys = rng.row_keys(key, batch)
  prompt_lengths = prompt_lengths.astype(jnp.int32)

  def draw(logits, step, done, lengths):
    """Emits the token at generated index `step` (see `emit.token`): (token, done, lengths)."""
    position_keys = rng.position_keys(keys, prompt_lengths + step)
    token = jax.vmap(sample_token, in_axes=(0, 0, None))(position_keys, logits, config.sampling)
    return emit.token(token, done, lengths, config.eos_id, config.pad_id)

  logits, cache = prefill(model, params, prompt, model.init_cache(batch, prompt_len + steps))
  cache = cache.replace(lengths=prompt_lengths)

  token, done, lengths = draw(last_prompt_logits(logits, prompt_lengths), 0,
                              jnp.zeros((batch,), bool), jnp.zeros((batch,), jnp.int32))
  tokens = jnp.full((batch, steps), config.pad_id, jnp.int32).at[:, 0].set(token)
  state = dict(step=jnp.int32(1), tokens=tokens, done=done, lengths=lengths, cache=cache,
               calls=jnp.int32(1))

  def cond(s):
    return (s["step"] < steps) & ~jnp.all(s["done"])

  def body(s):
    step = s["step"]
    previous = jax.lax.dynamic_slice_in_dim(s["tokens"], step - 1, 1, axis=1)
    logits, cache = model.apply(params, previous, (prompt_lengths + step - 1)[:, None], s["cache"])
    token, done, lengths = draw(logits[:, 0], step, s["done"], s["lengths"])
    return dict(step=step + 1, tokens=s["tokens"].at[:, step].set(token), done=done,
                lengths=lengths, cache=cache, calls=s["calls"] + 1)

  state = jax.lax.while_loop(cond, body, state)
  stats = {"model_calls": state["calls"], "generated_tokens": jnp.sum(state["lengths"])}
  return SampleOutput(tokens=state["tokens"], lengths=state["lengths"], stats=stats)


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Right-pads token lists into (prompt [B, P] int32, prompt_lengths [B] int32) for `sample`."""
  lengths = np.array([len(p) for p in prompts], np.int32)
  if not len(prompts) or lengths.min() < 1:
    raise ValueError("pad_prompts needs at least one prompt and no empty prompt")
  padded = np.full((len(prompts), lengths.max()), pad_id, np.int32)
  for row, tokens in enumerate(prompts):
    padded[row, :len(tokens)] = tokens
  return padded, lengths


@dataclasses.dataclass(frozen=True)
class AROptions:
  """Kind "ar" has no settings beyond those every decode shares."""


SPEC = SamplerSpec("ar", AROptions, sample, lambda options, decode: ARConfig(**decode.common()))

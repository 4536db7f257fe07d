"""Jacobi decoding: greedy fixed-point iteration over a block of guessed tokens.

Santilli et al. 2023 ("Accelerating Transformer Inference for Translation via Parallel
Decoding"); the iteration CLLMs (Kou et al. 2024) train for and lookahead decoding (Fu et al. 2024)
extends. A block of n tokens after the committed prefix is iterated as
y^{t+1}_i = argmax p(. | prefix, y^t_<i), all i in one target call. A guess whose left context did
not change is final, so each call commits the longest prefix of guesses its own outputs confirm
plus one token, and refills the block from the remaining outputs.

Guarantee: the output equals greedy autoregressive decoding token for token (at least one token is
committed per call, and every committed token is the target's argmax given the committed prefix),
up to numerical near-ties between a one-token and an n-token call (float32 matmuls over 1 and n rows can differ in the last bits).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from samplers.core import emit
from samplers.core.protocol import (CausalModel, SampleOutput, check_max_new_tokens,
                               last_prompt_logits, prefill)
from samplers.spec import Decode, SamplerSpec


@dataclasses.dataclass(frozen=True)
class JacobiConfig:
  """Attributes:
    block_size: n >= 2, tokens decoded per target call (the last committed token + n - 1 guesses).
    max_new_tokens: N, tokens generated per row at most.
    eos_id: a row stops after emitting it; None never stops early.
    pad_id: fills `SampleOutput.tokens` after a row's end.
  """

  block_size: int
  max_new_tokens: int
  eos_id: int | None = None
  pad_id: int = 0

  def __post_init__(self):
    if self.block_size < 2:
      raise ValueError(f"block_size must be >= 2 (one committed token and a guess), "
                       f"got {self.block_size}")
    check_max_new_tokens(self.max_new_tokens)



@functools.partial(jax.jit, static_argnames=("model", "config"))
def sample(model: CausalModel, params, prompt: jax.Array, prompt_lengths: jax.Array,
           key: jax.Array, config: JacobiConfig) -> SampleOutput:
  """Greedy continuation of right-padded prompts by Jacobi iteration.

  Args:
    model: a hashable `CausalModel` (static); params: its parameters.
    prompt: [B, P] int32 right-padded; prompt_lengths: [B] int32 in [1, P].
    key: unused (Jacobi decoding is greedy); kept for the common sampler signature.
    config: static `JacobiConfig`.
  Returns:
    SampleOutput with tokens [B, N]; stats `model_calls` = `target_calls` (prefill included),
    `generated_tokens`, `iterations` (target calls after the prefill),
    `tokens_per_target_call` and `iterations_per_block` (calls per n generated tokens).
  Raises:
    ValueError: if P + N + n - 1 exceeds model.max_len.
  """
  del key
  batch, prompt_len = prompt.shape
  n, steps = config.block_size, config.max_new_tokens
  slots = prompt_len + steps + n - 1  # the last block may reach n - 1 slots past the end
  if slots > model.max_len:
    raise ValueError(f"prompt length {prompt_len} + max_new_tokens {steps} + block_size {n} - 1 "
                     f"= {slots} exceeds the model's max_len {model.max_len}")
  prompt_lengths = prompt_lengths.astype(jnp.int32)
  rows = jnp.arange(batch)
  logits, cache = prefill(model, params, prompt, model.init_cache(batch, slots))
  first = jnp.argmax(last_prompt_logits(logits, prompt_lengths), axis=-1).astype(jnp.int32)
  first, done, count = emit.token(first, jnp.zeros((batch,), bool),
                                  jnp.zeros((batch,), jnp.int32), config.eos_id, config.pad_id)
  tokens = jnp.full((batch, steps + n), config.pad_id, jnp.int32).at[:, 0].set(first)
  state = dict(tokens=tokens, count=count, done=done | (count >= steps),
               guesses=jnp.broadcast_to(first[:, None], (batch, n - 1)), cache=cache,
               iterations=jnp.int32(0))

  def body(s):
    count = s["count"]
    context = prompt_lengths + count  # committed tokens per row (prompt included)
    committed_last = s["tokens"][rows, count - 1]
    inputs = jnp.concatenate([committed_last[:, None], s["guesses"]], axis=1)  # [B, n]
    positions = (context - 1)[:, None] + jnp.arange(n)[None, :]
    logits, cache = model.apply(params, inputs, positions,
                                s["cache"].replace(lengths=context - 1))
    outputs = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B, n]: y_i for position context+i
    confirmed = jnp.cumprod(s["guesses"] == outputs[:, :-1], axis=1)
    offered = 1 + jnp.sum(confirmed, axis=1)  # [B] in [1, n]
    new, committed, done = emit.block(outputs, offered, count, s["done"], steps, config.eos_id)
    columns = jnp.where(new, count[:, None] + jnp.arange(n)[None, :], steps + n)  # off: dropped
    tokens = s["tokens"].at[rows[:, None], columns].set(outputs, mode="drop")
    take = committed - count  # [B] tokens committed now (0 in finished rows)
    refill = jnp.clip(take[:, None] + jnp.arange(n - 1)[None, :], 0, n - 1)
    guesses = jnp.take_along_axis(outputs, refill, axis=1)
    return dict(tokens=tokens, count=committed, done=done, guesses=guesses, cache=cache,
                iterations=s["iterations"] + 1)

  s = jax.lax.while_loop(lambda s: ~jnp.all(s["done"]), body, state)
  out = emit.pad_after(s["tokens"][:, :steps], s["count"], config.pad_id)
  generated = jnp.sum(s["count"])
  calls = 1 + s["iterations"]
  stats = {
      "model_calls": calls,
      "target_calls": calls,
      "generated_tokens": generated,
      "iterations": s["iterations"],
      "tokens_per_target_call": generated / (batch * calls).astype(jnp.float32),
      # target calls per n tokens a row gets from the iterations (its first comes from the prefill)
      "iterations_per_block": s["iterations"] * n * batch / jnp.maximum(
          generated - batch, 1).astype(jnp.float32),
  }
  return SampleOutput(tokens=out, lengths=s["count"], stats=stats)


@dataclasses.dataclass(frozen=True)
class JacobiOptions:
  """`sampler.*` settings of kind "jacobi" (greedy only: sampler.temperature=0).

  Attributes:
    block_size: n >= 2, tokens per Jacobi iteration.
  """

  block_size: int = 8


def _build(options: JacobiOptions, decode: Decode) -> JacobiConfig:
  if decode.sampling.temperature != 0:
    raise ValueError(f"kind jacobi decodes greedily; set sampler.temperature=0 "
                     f"(got {decode.sampling.temperature})")
  return JacobiConfig(block_size=options.block_size, max_new_tokens=decode.max_new_tokens,
                      eos_id=decode.eos_id, pad_id=decode.pad_id)


SPEC = SamplerSpec("jacobi", JacobiOptions, sample, _build, slack=lambda o: o.block_size)

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

from samplers.protocol import CausalModel, SampleOutput, prefill


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
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")



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
  last = jnp.take_along_axis(logits, (prompt_lengths - 1)[:, None, None], axis=1)[:, 0]
  first = jnp.argmax(last, axis=-1).astype(jnp.int32)
  tokens = jnp.full((batch, steps + n), config.pad_id, jnp.int32).at[:, 0].set(first)
  done = first == config.eos_id if config.eos_id is not None else jnp.zeros((batch,), bool)
  state = dict(tokens=tokens, count=jnp.ones((batch,), jnp.int32), done=done | (steps == 1),
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
    take = 1 + jnp.sum(confirmed, axis=1)  # [B] in [1, n]
    take = jnp.minimum(take, steps - count)
    index = jnp.arange(n)[None, :]
    new = index < take[:, None]
    if config.eos_id is not None:  # cut after the first eos among the committed tokens
      eos_seen = jnp.cumsum((outputs == config.eos_id) & new, axis=1)
      new &= (eos_seen - ((outputs == config.eos_id) & new)) == 0
      hit_eos = jnp.any((outputs == config.eos_id) & new, axis=1)
    else:
      hit_eos = jnp.zeros((batch,), bool)
    take = jnp.where(s["done"], 0, jnp.sum(new, axis=1))
    columns = jnp.where(index < take[:, None], count[:, None] + index, steps + n)  # off = dropped
    tokens = s["tokens"].at[rows[:, None], columns].set(outputs, mode="drop")
    refill = jnp.clip(take[:, None] + jnp.arange(n - 1)[None, :], 0, n - 1)
    guesses = jnp.take_along_axis(outputs, refill, axis=1)
    count = count + take
    done = s["done"] | hit_eos | (count >= steps)
    return dict(tokens=tokens, count=count, done=done, guesses=guesses, cache=cache,
                iterations=s["iterations"] + 1)

  s = jax.lax.while_loop(lambda s: ~jnp.all(s["done"]), body, state)
  index = jnp.arange(steps)[None, :]
  out = jnp.where(index < s["count"][:, None], s["tokens"][:, :steps], config.pad_id)
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

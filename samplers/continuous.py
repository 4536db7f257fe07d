"""Continuous batching for AR decoding: a fixed set of slots, each holding one request.

Static batching decodes a batch until its slowest row ends, and admits nothing meanwhile.
Continuous batching (Orca, Yu et al. 2022; vLLM) keeps S slots of one KV cache: a finished
request's slot takes the next waiting one, so the batch stays full under load. The compiled
programs keep static shapes: `admit` prefills one request into one slot (its prompt right-padded
to a fixed width), `step` advances every slot by k tokens; a host-side scheduler
(`paxlike.serving`) decides what to admit between steps.

Each slot has its own write pointer, so requests of different lengths share the cache; a slot
that is free or finished still computes (static shapes) but its pointer does not move and its
output is not written.

Guarantee: a request's tokens are those of `samplers.ar` decoding it alone with its own key
(the token at absolute position t drawn with fold_in(key, t)): they do not depend on its slot or
its neighbours (tested; greedy up to numerical near-ties between batched and single-row calls).
"""

from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp

from samplers.core import rng
from samplers.core.logits import SamplingParams, sample_token
from samplers.core.protocol import CausalModel, check_max_new_tokens, last_prompt_logits, prefill


@dataclasses.dataclass(frozen=True)
class ContinuousConfig:
  """Attributes:
    num_slots: S, requests decoded at once.
    max_new_tokens: N, the most tokens a request may ask for (the output buffer's width).
    prompt_width: P, the width prompts are right-padded to for `admit`.
    sampling: how tokens are drawn.
    eos_id: a request ends after emitting it; None never ends early.
    pad_id: fills a slot's output after its request's end.
  """

  num_slots: int
  max_new_tokens: int
  prompt_width: int
  sampling: SamplingParams = SamplingParams()
  eos_id: int | None = None
  pad_id: int = 0

  def __post_init__(self):
    check_max_new_tokens(self.max_new_tokens)
    if self.num_slots < 1 or self.prompt_width < 1:
      raise ValueError(f"num_slots and prompt_width must be >= 1, got {self.num_slots} and "
                       f"{self.prompt_width}")

  @property
  def cache_len(self) -> int:
    """Cache slots per row: the longest prompt plus the most new tokens."""
    return self.prompt_width + self.max_new_tokens


@flax.struct.dataclass
class Slots:
  """The decode state of S slots.

  Attributes:
    cache: the model's cache with S rows.
    last: [S] int32 each slot's newest token (at position `length`, not yet in the cache).
    length: [S] int32 tokens in each slot's cache (its prompt and all but its newest token).
    tokens: [S, N] int32 each slot's generated tokens (pad after its end).
    count: [S] int32 tokens generated so far.
    limit: [S] int32 tokens its request asked for.
    keys: [S] typed keys, one per request.
    active: [S] bool: holds a request that has not ended.
  """

  cache: object
  last: jax.Array
  length: jax.Array
  tokens: jax.Array
  count: jax.Array
  limit: jax.Array
  keys: jax.Array
  active: jax.Array


def init(model: CausalModel, config: ContinuousConfig) -> Slots:
  """S free slots."""
  slots = config.num_slots
  zeros = lambda: jnp.zeros((slots,), jnp.int32)  # distinct buffers: the slots are donated
  if config.cache_len > model.max_len:
    raise ValueError(f"prompt_width {config.prompt_width} + max_new_tokens "
                     f"{config.max_new_tokens} = {config.cache_len} exceeds the model's max_len "
                     f"{model.max_len}; lower either")
  return Slots(cache=model.init_cache(slots, config.cache_len), last=zeros(), length=zeros(),
               tokens=jnp.full((slots, config.max_new_tokens), config.pad_id, jnp.int32),
               count=zeros(), limit=zeros(), keys=jax.random.split(jax.random.key(0), slots),
               active=jnp.zeros((slots,), bool))


def _draw(keys: jax.Array, positions: jax.Array, logits: jax.Array,
          sampling: SamplingParams) -> jax.Array:
  """[S] tokens at absolute `positions` [S], each slot with its own request's key."""
  return jax.vmap(sample_token, in_axes=(0, 0, None))(rng.position_keys(keys, positions),
                                                      logits, sampling)


def _ended(token: jax.Array, count: jax.Array, limit: jax.Array, config: ContinuousConfig):
  ended = count >= limit
  return ended if config.eos_id is None else ended | (token == config.eos_id)


@functools.partial(jax.jit, static_argnames=("model", "config"), donate_argnames=("slots",))
def admit(model: CausalModel, params, slots: Slots, slot: jax.Array, prompt: jax.Array,
          prompt_length: jax.Array, key: jax.Array, limit: jax.Array,
          config: ContinuousConfig) -> Slots:
  """Prefills one request into `slot` and draws its first token.

  Args:
    slot: [] int32 a free slot's index.
    prompt: [P] int32 the prompt right-padded to `config.prompt_width`; prompt_length: [] int32.
    key: the request's typed key; limit: [] int32 tokens it asks for, in [1, N].
  Returns:
    the slots with the request in `slot` (already ended if its first token ends it).
  """
  logits, row = prefill(model, params, prompt[None], model.init_cache(1, config.cache_len))
  row = row.replace(lengths=prompt_length[None])
  first = _draw(key[None], prompt_length[None], last_prompt_logits(logits, prompt_length[None]),
                config.sampling)[0]
  put = lambda whole, one: jax.lax.dynamic_update_slice_in_dim(whole, one.astype(whole.dtype),
                                                               slot, axis=0)
  tokens = jnp.full((config.max_new_tokens,), config.pad_id, jnp.int32).at[0].set(first)
  return slots.replace(
      cache=jax.tree.map(put, slots.cache, row), last=slots.last.at[slot].set(first),
      length=slots.length.at[slot].set(prompt_length), tokens=put(slots.tokens, tokens[None]),
      count=slots.count.at[slot].set(1), limit=slots.limit.at[slot].set(limit),
      keys=put(slots.keys, key[None]),
      active=slots.active.at[slot].set(~_ended(first, jnp.int32(1), limit, config)))


@functools.partial(jax.jit, static_argnames=("model", "config", "steps"),
                   donate_argnames=("slots",))
def step(model: CausalModel, params, slots: Slots, config: ContinuousConfig,
         steps: int = 1) -> Slots:
  """Advances every active slot by up to `steps` tokens (one model call each)."""

  def one(_, s: Slots) -> Slots:
    logits, cache = model.apply(params, s.last[:, None], s.length[:, None],
                                s.cache.replace(lengths=s.length))
    token = _draw(s.keys, s.length + 1, logits[:, 0], config.sampling)
    write = s.active & (s.count < config.max_new_tokens)
    index = jnp.minimum(s.count, config.max_new_tokens - 1)
    tokens = s.tokens.at[jnp.arange(token.shape[0]), index].set(
        jnp.where(write, token, s.tokens[jnp.arange(token.shape[0]), index]))
    count = s.count + s.active
    return s.replace(cache=cache, last=jnp.where(s.active, token, s.last),
                     length=s.length + s.active, tokens=tokens, count=count,
                     active=s.active & ~_ended(token, count, s.limit, config))

  return jax.lax.fori_loop(0, steps, one, slots)

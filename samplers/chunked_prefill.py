"""Chunked prefill for continuous batches (Sarathi-Serve, Agrawal et al. 2024, "Taming
Throughput-Latency Tradeoff in LLM Inference with Sarathi-Serve").

`continuous.admit` prefills a whole prompt in one call, and every slot's decoding waits for it:
one long prompt stalls the batch for as long as its prefill takes. Here a request is `enqueue`d
into a free slot without computing anything, and each `step_with_chunk` call feeds the next
`chunk` of its prompt into that slot's cache (one row, C tokens) before the usual AR steps of
every active slot; the call that completes the prompt draws the request's first token, and the
slot decodes from the next step on. A decode step then waits for at most one chunk, whatever
the prompt's length.

Guarantee: the cache a prompt gets chunk by chunk equals its one-shot prefill (tested, up to
float rounding of the different matmul shapes), so a request's tokens are still its batch-1 AR
decode (greedy, up to numerical near-ties). AR slots only: a slot prefilled this way has no
draft cache.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from samplers import continuous
from samplers.continuous import ContinuousConfig, Slots
from samplers.core.protocol import CausalModel


def check_chunk(chunk: int, config: ContinuousConfig) -> None:
  """ValueError unless 1 <= chunk <= N + G (a chunk read at the end of a prompt stays in seq)."""
  room = config.max_new_tokens + config.max_draft_tokens
  if not 1 <= chunk <= room:
    raise ValueError(f"chunk must be in [1, max_new_tokens + max_draft_tokens = {room}], "
                     f"got {chunk}")


@functools.partial(jax.jit, static_argnames=("config",), donate_argnames=("slots",))
def enqueue(slots: Slots, slot: jax.Array, prompt: jax.Array, prompt_length: jax.Array,
            key: jax.Array, limit: jax.Array, config: ContinuousConfig) -> Slots:
  """Puts a request into free `slot` with nothing of its prompt in the cache yet (inactive until
  `step_with_chunk` completes its prompt). Arguments as `continuous.admit`'s."""
  row = jnp.zeros((config.cache_len,), jnp.int32).at[:config.prompt_width].set(prompt)
  return slots.replace(seq=slots.seq.at[slot].set(row),
                       prompt_length=slots.prompt_length.at[slot].set(prompt_length),
                       n=slots.n.at[slot].set(0), limit=slots.limit.at[slot].set(limit),
                       keys=slots.keys.at[slot].set(key), active=slots.active.at[slot].set(False),
                       prefilled=slots.prefilled.at[slot].set(0),
                       draft_length=slots.draft_length.at[slot].set(0))


@functools.partial(jax.jit, static_argnames=("model", "config", "chunk", "steps", "rows"),
                   donate_argnames=("slots",))
def step_with_chunk(model: CausalModel, params, slots: Slots, slot: jax.Array,
                    config: ContinuousConfig, chunk: int, steps: int = 1,
                    rows: int | None = None) -> Slots:
  """Feeds the next `chunk` prompt tokens of `slot` (an `enqueue`d request) into its cache and
  draws its first token if they complete the prompt, then advances every active slot by `steps`
  AR tokens (`continuous.step`, on the first `rows` slots with `rows`)."""
  check_chunk(chunk, config)
  start, length = slots.prefilled[slot], slots.prompt_length[slot]
  positions = start + jnp.arange(chunk)
  tokens = jax.lax.dynamic_slice_in_dim(slots.seq[slot], start, chunk)
  take = lambda x: jax.lax.dynamic_slice_in_dim(x, slot, 1, axis=0)
  row = jax.tree.map(take, slots.cache).replace(lengths=start[None])
  logits, row = model.apply(params, tokens[None], positions[None], row)
  put = lambda whole, one: jax.lax.dynamic_update_slice_in_dim(whole, one, slot, axis=0)
  cache = jax.tree.map(put, slots.cache, row)
  completes = (start < length) & (start + chunk >= length)
  last = jax.lax.dynamic_index_in_dim(logits[0], jnp.clip(length - 1 - start, 0, chunk - 1),
                                      keepdims=False)
  first = continuous.draw_at(slots.keys[slot][None], length[None], last[None], config.sampling)[0]
  only = jnp.arange(config.num_slots) == slot
  slots = slots.replace(cache=cache, prefilled=slots.prefilled.at[slot].set(
      jnp.minimum(start + chunk, length)), active=slots.active | (only & completes))
  slots = continuous.commit(slots, jnp.broadcast_to(first, (config.num_slots, 1)),
                            (only & completes).astype(jnp.int32), config)
  return continuous.step(model, params, slots, config, steps, rows)

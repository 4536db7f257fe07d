"""Chunked prefill piggybacked on decode steps (Sarathi-Serve, Agrawal et al. 2024, "Taming
Throughput-Latency Tradeoff in LLM Inference with Sarathi-Serve").

`continuous.admit` prefills a whole prompt in a call of its own: every slot's decoding waits for
it, and the call reads the weights once more for tokens a decode step could have carried. Here a
request is `enqueue`d into a free slot without computing anything, and each `step_piggybacked`
call feeds the next C tokens of K such prompts into their slots' caches in the same model call as
one decode step of every other slot (`CausalModel.apply_step_with_chunks`: one pass over the
weights for B + K x C tokens), then runs the call's remaining AR steps. The call that completes a
prompt draws its request's first token, and the slot decodes from the next step on. A decode step
then waits for at most one chunk, whatever the prompt's length, and a prompt costs its own tokens
(a chunk is padded to C, not the prompt to a prefill bucket).

Guarantee: the cache a prompt gets chunk by chunk equals its one-shot prefill (tested, up to
float rounding of the different matmul shapes), so a request's tokens are still its batch-1 AR
decode (greedy, up to numerical near-ties; sampled, with its own key). With a draft model the
chunk is fed to the draft's cache too, in a call of its own.
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
  `step_piggybacked` completes its prompt). Arguments as `continuous.admit`'s."""
  row = jnp.zeros((config.cache_len,), jnp.int32).at[:config.prompt_width].set(prompt)
  return slots.replace(seq=slots.seq.at[slot].set(row),
                       prompt_length=slots.prompt_length.at[slot].set(prompt_length),
                       n=slots.n.at[slot].set(0), limit=slots.limit.at[slot].set(limit),
                       keys=slots.keys.at[slot].set(key), active=slots.active.at[slot].set(False),
                       prefilled=slots.prefilled.at[slot].set(0),
                       draft_length=slots.draft_length.at[slot].set(0))


def _piggybacked(model: CausalModel, params, slots: Slots, slot: jax.Array,
                 config: ContinuousConfig, chunk: int, draft: CausalModel | None,
                 draft_params) -> Slots:
  """One decode step of the slots with the next `chunk` prompt tokens of `slot` [K] fed beside
  it (module docstring)."""
  batch = slots.n.shape[0]
  valid = slot < batch
  row = jnp.minimum(slot, batch - 1)
  chunk_rows = jnp.where(valid, slot, batch)
  start, length = slots.prefilled[row], slots.prompt_length[row]
  positions = start[:, None] + jnp.arange(chunk)
  tokens = jnp.take_along_axis(slots.seq[row], positions, axis=1, mode="clip")
  fed = jnp.any(jnp.arange(batch)[:, None] == chunk_rows[None, :], axis=1)  # [B]
  context = slots.context
  logits, chunk_logits, cache = model.apply_step_with_chunks(
      params, continuous.newest(slots), context - 1, ~fed, tokens, positions, chunk_rows,
      jnp.clip(length - 1 - start, 0, chunk - 1),
      slots.cache.replace(lengths=jnp.where(fed, slots.prefilled, context - 1)))
  token = continuous.draw_at(slots.keys, context, logits, config.sampling)
  slots = continuous.commit(slots.replace(cache=cache), token[:, None], jnp.ones_like(slots.n),
                            config)
  if draft is not None:
    take = lambda whole: whole[row]
    rows = jax.tree.map(take, slots.draft_cache).replace(lengths=start)
    _, rows = draft.apply(draft_params, tokens, positions, rows)
    put = lambda whole, part: whole.at[chunk_rows].set(part, mode="drop")
    draft_length = jnp.minimum(start + chunk, length - 1)
    slots = slots.replace(draft_cache=jax.tree.map(put, slots.draft_cache, rows),
                          draft_length=slots.draft_length.at[chunk_rows].set(draft_length,
                                                                              mode="drop"))
  completes = valid & (start < length) & (start + chunk >= length)
  first = continuous.draw_at(slots.keys[row], length, chunk_logits, config.sampling)
  now = jnp.zeros((batch,), bool).at[chunk_rows].set(completes, mode="drop")
  slots = slots.replace(
      prefilled=slots.prefilled.at[chunk_rows].set(jnp.minimum(start + chunk, length),
                                                   mode="drop"),
      active=slots.active | now)
  new = jnp.zeros((batch, 1), jnp.int32).at[chunk_rows, 0].set(first, mode="drop")
  return continuous.commit(slots, new, now.astype(jnp.int32), config)


@functools.partial(jax.jit, static_argnames=("model", "config", "chunk", "steps", "rows",
                                             "draft"),
                   donate_argnames=("slots",))
def step_piggybacked(model: CausalModel, params, slots: Slots, slot: jax.Array,
                     config: ContinuousConfig, chunk: int, steps: int = 1,
                     rows: int | None = None, draft: CausalModel | None = None,
                     draft_params=None) -> Slots:
  """`steps` AR steps of every active slot, the first carrying the next `chunk` prompt tokens of
  each of the `enqueue`d requests in `slot` [K] (an index >= S: no chunk) in the same model call;
  a chunk that completes its prompt draws the request's first token. With `rows`, only the
  first `rows` slots are computed (`continuous.on_rows`; the chunks' slots must be among them).
  With a draft, each chunk is fed to the draft's cache too.

  The model needs `apply_step_with_chunks` (a llama `CausalLM` has it)."""
  check_chunk(chunk, config)
  if steps < 1:
    raise ValueError(f"steps must be >= 1 (the first carries the chunks), got {steps}")
  if not hasattr(model, "apply_step_with_chunks"):
    raise ValueError("piggybacked prefill needs a model with apply_step_with_chunks (e.g. a "
                     "llama CausalLM); admit prompts with continuous.admit instead")
  slots = continuous.on_rows(
      lambda s: _piggybacked(model, params, s, slot, config, chunk, draft, draft_params),
      slots, rows)
  return continuous.step(model, params, slots, config, steps - 1, rows)

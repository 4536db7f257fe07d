"""Continuous batching: a fixed set of slots, each holding one request, for AR and speculative
decoding.

Static batching decodes a batch until its slowest row ends, and admits nothing meanwhile.
Continuous batching (Orca, Yu et al. 2022; vLLM) keeps S slots of one KV cache: a finished
request's slot takes the next waiting one, so the batch stays full under load. The compiled
programs keep static shapes: `admit` prefills K requests into K free slots in one call (prompts
right-padded to a bucket width), `step` advances every slot by k AR tokens, and
`samplers.continuous_spec` advances them by speculative rounds (`samplers.chunked_prefill`
feeds prompts in chunks carried by decode steps; `fill` and `place` split admission across
devices). Any
of them can run on the first k slots only (`on_rows`), so that a call costs what its load costs.
A host-side scheduler (`paxlike.serving`) decides what to admit, and which program to run on
how many rows, between calls.

Each slot holds its request's prompt and generated tokens (`seq`) and its own pointers, so
requests of different lengths share the cache; a slot that is free or finished still computes
(static shapes) but its pointers do not move and nothing is committed. With a draft model the
slots also hold its cache; AR steps leave it behind, and the next speculative round catches it
up (`draft_length`).

Guarantee: with AR steps, a request's tokens are those of `samplers.ar` decoding it alone with
its own key (the token at absolute position t drawn with fold_in(key, t)): they do not depend on
its slot or its neighbours (tested; greedy up to numerical near-ties between batched and
single-row calls).
"""

from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp

from samplers.core import draft_verify, emit, rng
from samplers.core.logits import SamplingParams, sample_token
from samplers.core.protocol import (CausalModel, check_max_new_tokens, check_vocabularies,
                                    last_prompt_logits, prefill)


@dataclasses.dataclass(frozen=True)
class ContinuousConfig:
  """Attributes:
    num_slots: S, requests decoded at once.
    max_new_tokens: N, the most tokens a request may ask for.
    prompt_width: P, the width prompts are right-padded to for `admit`.
    sampling: how tokens are drawn.
    eos_id: a request ends after emitting it; None never ends early.
    pad_id: fills a slot's output after its request's end.
    max_draft_tokens: G, the longest speculative round the slots make room for (0: AR only).
  """

  num_slots: int
  max_new_tokens: int
  prompt_width: int
  sampling: SamplingParams = SamplingParams()
  eos_id: int | None = None
  pad_id: int = 0
  max_draft_tokens: int = 0

  def __post_init__(self):
    check_max_new_tokens(self.max_new_tokens)
    if self.num_slots < 1 or self.prompt_width < 1:
      raise ValueError(f"num_slots and prompt_width must be >= 1, got {self.num_slots} and "
                       f"{self.prompt_width}")
    if self.max_draft_tokens < 0:
      raise ValueError(f"max_draft_tokens must be >= 0, got {self.max_draft_tokens}")

  @property
  def cache_len(self) -> int:
    """Cache slots per row: the longest prompt, the most new tokens and a round's overhang."""
    return self.prompt_width + self.max_new_tokens + self.max_draft_tokens


@flax.struct.dataclass
class Slots:
  """The decode state of S slots.

  Attributes:
    cache: the target's cache with S rows; it holds each slot's tokens but its newest.
    draft_cache: the draft's cache with S rows, or None without a draft.
    seq: [S, P + N + G] int32 each slot's prompt, then its generated tokens.
    prompt_length: [S] int32.
    n: [S] int32 tokens generated so far (the newest, at prompt_length + n - 1, not yet cached).
    limit: [S] int32 tokens its request asked for.
    keys: [S] typed keys, one per request.
    active: [S] bool: holds a request that has not ended.
    draft_length: [S] int32 leading tokens of `seq` the draft's cache holds.
    prefilled: [S] int32 prompt tokens in the target's cache (all of them once a request is
      admitted; `samplers.chunked_prefill` feeds them a chunk per call).
    accepted, drafted, rejected: [] int32 drafts accepted and proposed by active slots so far,
      and their rounds that ended in a rejection (for the serving policies' acceptance
      estimates: accepted / (accepted + rejected) estimates the per-draft acceptance rate).
  """

  cache: object
  draft_cache: object
  seq: jax.Array
  prompt_length: jax.Array
  n: jax.Array
  limit: jax.Array
  keys: jax.Array
  active: jax.Array
  draft_length: jax.Array
  prefilled: jax.Array
  accepted: jax.Array
  drafted: jax.Array
  rejected: jax.Array

  @property
  def context(self) -> jax.Array:
    """[S] int32 tokens each slot holds (prompt and generated)."""
    return self.prompt_length + self.n


def init(model: CausalModel, config: ContinuousConfig, draft: CausalModel | None = None) -> Slots:
  """S free slots (with the draft's cache too when a draft is given)."""
  slots = config.num_slots
  zeros = lambda: jnp.zeros((slots,), jnp.int32)  # distinct buffers: the slots are donated
  models = {"target": model, **({"draft": draft} if draft is not None else {})}
  if draft is not None:
    check_vocabularies(model, draft, ("target", "draft"))
  draft_verify.check_room(
      models, config.cache_len,
      f"prompt_width {config.prompt_width} + max_new_tokens {config.max_new_tokens} + "
      f"max_draft_tokens {config.max_draft_tokens}", "any of them")
  return Slots(cache=model.init_cache(slots, config.cache_len),
               draft_cache=None if draft is None else draft.init_cache(slots, config.cache_len),
               seq=jnp.zeros((slots, config.cache_len), jnp.int32), prompt_length=zeros(),
               n=zeros(), limit=zeros(), keys=jax.random.split(jax.random.key(0), slots),
               active=jnp.zeros((slots,), bool), draft_length=zeros(), prefilled=zeros(),
               accepted=jnp.int32(0),
               drafted=jnp.int32(0), rejected=jnp.int32(0))


def draw_at(keys: jax.Array, positions: jax.Array, logits: jax.Array,
          sampling: SamplingParams) -> jax.Array:
  """[S] tokens at absolute `positions` [S], each slot with its own request's key."""
  return jax.vmap(sample_token, in_axes=(0, 0, None))(rng.position_keys(keys, positions),
                                                      logits, sampling)


def newest(slots: Slots) -> jax.Array:
  """[S] int32 each slot's newest token (at context - 1), the one the next call feeds."""
  return draft_verify.newest(slots.seq, slots.context)[:, 0]


def commit(slots: Slots, new: jax.Array, count: jax.Array, config: ContinuousConfig) -> Slots:
  """Appends new[s, :count[s]] [S, W] to each active slot, cut after eos and at its limit."""
  seq, n, done = draft_verify.commit(slots.seq, slots.prompt_length, slots.n, ~slots.active, new,
                                     count, slots.limit, config.eos_id)
  return slots.replace(seq=seq, n=n, active=~done)


PER_SLOT = ("cache", "draft_cache", "seq", "prompt_length", "n", "limit", "keys", "active",
            "draft_length", "prefilled")  # the fields with a slot axis


def _prefilled(model: CausalModel, params, prompt: jax.Array, prompt_length: jax.Array,
               keys: jax.Array, limit: jax.Array, config: ContinuousConfig,
               draft: CausalModel | None, draft_params) -> Slots:
  """K requests prefilled into K fresh slots, each with its first token drawn."""
  rows = prompt.shape[0]
  logits, cache = prefill(model, params, prompt, model.init_cache(rows, config.cache_len))
  draft_cache = None
  if draft is not None:
    draft_cache = prefill(draft, draft_params, prompt, draft.init_cache(rows, config.cache_len))[1]
  return fresh(cache, draft_cache, logits, prompt, prompt_length, keys, limit, config)


def fresh(cache, draft_cache, logits: jax.Array, prompt: jax.Array, prompt_length: jax.Array,
          keys: jax.Array, limit: jax.Array, config: ContinuousConfig) -> Slots:
  """K fresh slots around prefilled caches (the target's, and the drafter's state or None),
  each with its first token drawn from the prompt's `logits` [K, P', V] at its own key."""
  rows = prompt.shape[0]
  first = draw_at(keys, prompt_length, last_prompt_logits(logits, prompt_length), config.sampling)
  slots = Slots(cache=cache, draft_cache=draft_cache,
                seq=jnp.zeros((rows, config.cache_len), jnp.int32).at[:, :prompt.shape[1]].set(
                    prompt),
                prompt_length=prompt_length, n=jnp.zeros((rows,), jnp.int32), limit=limit,
                keys=keys, active=jnp.ones((rows,), bool), draft_length=prompt_length - 1,
                prefilled=prompt_length,
                accepted=jnp.int32(0), drafted=jnp.int32(0), rejected=jnp.int32(0))
  return commit(slots, first[:, None], jnp.ones((rows,), jnp.int32), config)


@functools.partial(jax.jit, static_argnames=("model", "config", "draft"))
def fill(model: CausalModel, params, prompt: jax.Array, prompt_length: jax.Array,
         keys: jax.Array, limit: jax.Array, config: ContinuousConfig,
         draft: CausalModel | None = None, draft_params=None) -> Slots:
  """K fresh slots, each prefilled with a request (and into the draft's cache): all S slots at
  once, or K rows for `place` (prefill on one device, decode on another).

  Args:
    prompt: [K, P'] int32 prompts right-padded to any P' <= `config.prompt_width`;
      prompt_length: [K] int32.
    keys: [K] the requests' typed keys; limit: [K] int32 tokens each asks for, in [1, N].
  """
  return _prefilled(model, params, prompt, prompt_length.astype(jnp.int32), keys,
                    limit.astype(jnp.int32), config, draft, draft_params)


def put(slots: Slots, slot: jax.Array, rows: Slots) -> Slots:
  """`rows` (K fresh slots) put into slots `slot` [K] (an index >= S is dropped)."""
  write = lambda whole, new: whole.at[slot].set(new.astype(whole.dtype), mode="drop")
  return slots.replace(**{field: jax.tree.map(write, getattr(slots, field), getattr(rows, field))
                          for field in PER_SLOT})


@functools.partial(jax.jit, donate_argnames=("slots",))
def place(slots: Slots, slot: jax.Array, rows: Slots) -> Slots:
  """Puts K prefilled `rows` (`fill`) into slots `slot` [K] (an index >= S is dropped)."""
  return put(slots, slot, rows)


@functools.partial(jax.jit, static_argnames=("model", "config", "draft"),
                   donate_argnames=("slots",))
def admit(model: CausalModel, params, slots: Slots, slot: jax.Array, prompt: jax.Array,
          prompt_length: jax.Array, key: jax.Array, limit: jax.Array, config: ContinuousConfig,
          draft: CausalModel | None = None, draft_params=None) -> Slots:
  """Prefills one request, or K at once, into free slots (and into the draft's cache) and draws
  each one's first token. K requests share one prefill call of K rows, which costs far less
  than K calls of one.

  Args:
    slot: [] int32 a free slot's index, or [K] (an index >= S marks a padding row, dropped).
    prompt: [P'] or [K, P'] int32 prompts right-padded to any P' <= `config.prompt_width`;
      prompt_length: [] or [K] int32.
    key: the requests' typed keys ([] or [K]); limit: [] or [K] int32 tokens each asks for, in
      [1, N].
  Returns:
    the slots with the requests in theirs (already ended if a first token ends one).
  """
  if slot.ndim == 0:
    slot, prompt, prompt_length, key, limit = (x[None] for x in (slot, prompt, prompt_length,
                                                                  key, limit))
  return put(slots, slot, _prefilled(model, params, prompt, prompt_length, key, limit, config,
                                        draft, draft_params))


def on_rows(fn, slots: Slots, rows: int | None) -> Slots:
  """`fn(slots) -> slots` applied to the first `rows` slots only (None: all of them).

  A program's cost follows the rows it computes, not the requests it holds: at low load, with
  requests admitted into the lowest free slots, running on the smallest power of two of rows
  that covers them costs what a batch of that size costs. The rest are left as they are."""
  return on_rows_with(lambda s: (fn(s), None), slots, rows)[0]


def on_rows_with(fn, slots: Slots, rows: int | None):
  """`on_rows` for `fn(slots) -> (slots, extra)`: (the slots, `extra` of the first `rows`)."""
  if rows is None or rows >= slots.n.shape[0]:
    return fn(slots)
  head, extra = fn(slots.replace(**{f: jax.tree.map(lambda x: x[:rows], getattr(slots, f))
                                    for f in PER_SLOT}))
  put = lambda whole, part: jax.lax.dynamic_update_slice_in_dim(whole, part, 0, axis=0)
  return head.replace(**{f: jax.tree.map(put, getattr(slots, f), getattr(head, f))
                         for f in PER_SLOT}), extra


@functools.partial(jax.jit, static_argnames=("model", "config", "steps", "rows"),
                   donate_argnames=("slots",))
def step(model: CausalModel, params, slots: Slots, config: ContinuousConfig, steps: int = 1,
         rows: int | None = None) -> Slots:
  """Advances every active slot by up to `steps` AR tokens (one target call each); with `rows`,
  only the first `rows` slots are computed (`on_rows`)."""

  def one(_, s: Slots) -> Slots:
    context = s.context
    logits, cache = model.apply(params, newest(s)[:, None], (context - 1)[:, None],
                                s.cache.replace(lengths=context - 1))
    token = draw_at(s.keys, context, logits[:, 0], config.sampling)
    return commit(s.replace(cache=cache), token[:, None], jnp.ones_like(s.n), config)

  return on_rows(lambda s: jax.lax.fori_loop(0, steps, one, s), slots, rows)


def generated(slots: Slots, config: ContinuousConfig) -> jax.Array:
  """[S, N] int32 each slot's generated tokens, pad_id after them."""
  return emit.generated(slots.seq, slots.prompt_length, slots.n, config.max_new_tokens,
                        config.pad_id)

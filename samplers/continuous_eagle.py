"""EAGLE rounds for continuous batches: the target's own feature-level head drafts for every slot.

`samplers.continuous_spec` drafts with a separate model whose cache AR steps leave behind. An
EAGLE head (Li et al. 2024, "EAGLE: Speculative Sampling Requires Rethinking Feature
Uncertainty"; `samplers.eagle`) reads the target's features instead, which only the target's
calls make, so here every program of the slots keeps the head current and there is never a
catch-up:

* `admit`: the prompt's prefill returns its features, the head reads the prompt's pairs
  (f_t, x_{t+1}) and the last prompt token's feature waits for the first generated token.
* `step`: AR steps that also return the features of the tokens they feed. A call first appends
  the pairs waiting from the last call to the head's cache (one head call over at most G + 1
  pairs per slot), then each step's feature waits to pair with the token it drew.
* `speculate`: a chain round of `samplers.eagle` per slot: the first head call appends the
  waiting pairs and drafts, gamma - 1 more draft, the target verifies the root and the gamma
  drafts in one call and returns their true features, which wait for the next call.

The head's state rides in `Slots.draft_cache` as `HeadState` (its one-layer cache and the
features waiting), so admission, `continuous.on_rows` and the serving engines carry it like a
draft's cache; `draft_length` always says the head lacks nothing (`continuous_spec.draft_lag`
is 0).

Guarantee: drafts are drawn from the head's distribution after each slot's own request key
(`draft_verify.round_noise`) and verified with the speculative rule, and whether a position is
drafted depends on the head alone, so every request's tokens have exactly the target's
distribution at any temperature, whatever mix of AR steps and rounds of any gamma the host
chooses; greedy tokens equal AR's (up to numerical near-ties between batched and single-token
target calls). With a fixed program sequence a request's tokens do not depend on its slot or
its neighbours (tested).
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp

from samplers import continuous, continuous_spec, eagle, eagle_tree
from samplers.continuous import ContinuousConfig, Slots


@flax.struct.dataclass
class HeadState:
  """The EAGLE head's state for S slots.

  Attributes:
    cache: the head's one-layer cache, S rows: the pairs of positions below context - 1 -
      `pending` (its `lengths` mean nothing between calls: each call sets them from the context
      and `pending`).
    features: [S, G + 1, E] the target's true features of the `pending` positions after them;
      the last pairs with the slot's newest token.
    pending: [S] int32 in [0, G + 1].
  """

  cache: object
  features: jax.Array
  pending: jax.Array


def init(target, target_params, config: ContinuousConfig) -> Slots:
  """S free slots of a target with an EAGLE head, its state in `draft_cache`.

  Raises:
    ValueError: the target has no EAGLE head, G = config.max_draft_tokens is 0, or the target's
      max_len is below `config.cache_len`.
  """
  eagle.check_head(target)
  if config.max_draft_tokens < 1:
    raise ValueError("continuous EAGLE needs max_draft_tokens >= 1 (the longest chain the slots "
                     f"make room for), got {config.max_draft_tokens}")
  slots = continuous.init(target, config)
  probe = jnp.zeros((1, 1), jnp.int32)
  feature = jax.eval_shape(lambda params: target.apply_with_features(
      params, probe, probe, target.init_cache(1, config.cache_len)), target_params)[1]
  rows = config.num_slots
  state = HeadState(
      cache=target.init_draft_cache(rows, config.cache_len),
      features=jnp.zeros((rows, config.max_draft_tokens + 1, feature.shape[-1]), feature.dtype),
      pending=jnp.zeros((rows,), jnp.int32))
  return slots.replace(draft_cache=state)


def _prefilled(target, params, prompt: jax.Array, prompt_length: jax.Array, keys: jax.Array,
               limit: jax.Array, config: ContinuousConfig) -> Slots:
  """K requests prefilled into K fresh slots (target and head), each with its first token."""
  logits, (cache, head, features, pending) = eagle.prefill_with_head(
      target, params, prompt, prompt_length, config.cache_len, config.max_draft_tokens + 1)
  state = HeadState(cache=head, features=features, pending=pending)
  return continuous.fresh(cache, state, logits, prompt, prompt_length, keys, limit, config)


@functools.partial(jax.jit, static_argnames=("target", "config"), donate_argnames=("slots",))
def admit(target, target_params, slots: Slots, slot: jax.Array, prompt: jax.Array,
          prompt_length: jax.Array, key: jax.Array, limit: jax.Array,
          config: ContinuousConfig) -> Slots:
  """`continuous.admit` for a target with an EAGLE head: K requests ([K] slot indices, >= S for
  padding rows; prompt [K, P'] right-padded; prompt_length, key, limit [K]) prefilled in one
  call into the target's cache and the head's, each with its first token drawn."""
  return continuous.put(slots, slot, _prefilled(target, target_params, prompt,
                                                prompt_length.astype(jnp.int32), key,
                                                limit.astype(jnp.int32), config))


def _flush(target, params, slots: Slots) -> Slots:
  """Appends every slot's waiting pairs to the head's cache (one head call, whose draft it
  discards); none wait after."""
  state, context = slots.draft_cache, slots.context
  _, _, cache = eagle_tree.append_pending(target, params, state.features, slots.seq, context,
                                          state.cache, state.pending)
  return slots.replace(draft_cache=state.replace(cache=cache,
                                                 pending=jnp.zeros_like(state.pending)))


def _check_steps(steps: int, config: ContinuousConfig) -> None:
  if not 1 <= steps <= config.max_draft_tokens + 1:
    raise ValueError(f"steps must be in [1, max_draft_tokens + 1 = {config.max_draft_tokens + 1}]"
                     f" (the features a call leaves waiting), got {steps}")


@functools.partial(jax.jit, static_argnames=("target", "config", "steps", "rows"),
                   donate_argnames=("slots",))
def step(target, target_params, slots: Slots, config: ContinuousConfig, steps: int = 1,
         rows: int | None = None) -> Slots:
  """Advances every active slot by up to `steps` AR tokens (one target call each, 1 <= steps <=
  G + 1) and keeps the head current; with `rows`, only the first `rows` slots
  (`continuous.on_rows`)."""
  _check_steps(steps, config)

  def one(_, s: Slots) -> Slots:
    context, state = s.context, s.draft_cache
    logits, features, cache = target.apply_with_features(
        target_params, continuous.newest(s)[:, None], (context - 1)[:, None],
        s.cache.replace(lengths=context - 1))
    token = continuous.draw_at(s.keys, context, logits[:, 0], config.sampling)
    at = jnp.where(s.active, state.pending, state.features.shape[1])  # free slots: dropped
    state = state.replace(
        features=state.features.at[jnp.arange(at.shape[0]), at].set(features[:, 0], mode="drop"),
        pending=state.pending + s.active)
    s = continuous.commit(s.replace(cache=cache, draft_cache=state), token[:, None],
                          jnp.ones_like(s.n), config)
    return s.replace(draft_length=s.context - 2)

  run = lambda s: jax.lax.fori_loop(0, steps, one, _flush(target, target_params, s))
  return continuous.on_rows(run, slots, rows)


def _round(target, params, slots: Slots, config: ContinuousConfig, gamma: int) -> Slots:
  """One EAGLE chain round of gamma drafts per active slot (`eagle.chain_round`), committed."""
  state, live = slots.draft_cache, slots.active
  caches = (slots.cache, state.cache, state.features, state.pending)
  (cache, head, features, pending), emitted, count, lengths, _ = eagle.chain_round(
      target, params, slots.keys, caches, slots.seq, slots.context, live, gamma, config.sampling)
  state = HeadState(cache=head, features=jnp.where(live[:, None, None], features, state.features),
                    pending=jnp.where(live, pending, state.pending))
  return continuous_spec.verified(slots.replace(cache=cache, draft_cache=state), emitted, count,
                                  lengths, config)


@functools.partial(jax.jit, static_argnames=("target", "config", "gamma", "rounds", "rows"),
                   donate_argnames=("slots",))
def speculate(target, target_params, slots: Slots, config: ContinuousConfig, gamma: int,
              rounds: int = 1, rows: int | None = None) -> Slots:
  """`rounds` EAGLE rounds in which every active slot's head drafts gamma tokens (1 <= gamma <=
  G = config.max_draft_tokens); with `rows`, only the first `rows` slots are computed."""
  continuous_spec.check_gamma(gamma, config)
  one = lambda _, s: _round(target, target_params, s, config, gamma)
  return continuous.on_rows(lambda s: jax.lax.fori_loop(0, rounds, one, s), slots, rows)

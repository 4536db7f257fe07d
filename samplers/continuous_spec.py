"""Speculative rounds for continuous batches (`samplers.continuous` slots with a draft model).

A round drafts after every slot's context with the draft model and verifies the drafts with one
target call, as `samplers.speculative` does for a fixed batch; here each slot has its own
request, pointers and limit, and the host may switch between programs from one call to the next
(`paxlike.serving`'s policies):

* `speculate`: every slot drafts gamma tokens (the fixed-length policy; SmartSpec, Liu et al.
  2024, "Optimizing Speculative Decoding for Serving Large Language Models Using Goodput",
  picks gamma per call from a cost model and the running acceptance, with gamma = 0 a plain
  `continuous.step`).
* `select`: batch draft selection (TETRIS, Wu et al. 2025, "TETRIS: Optimal Draft Token
  Selection for Batch Speculative Decoding"). Every slot drafts G tokens; the draft's own
  estimate that a slot's j-th draft is accepted is the product of its top probabilities along
  the chain; the `budget` drafts most likely to be accepted across the batch are verified (a
  confident slot gets a long chain, an unsure one a short one or none), and the verify width is
  the one that maximises expected tokens per second under the measured cost of each width.

AR steps leave the draft's cache behind; a round first feeds it the tokens it lacks
(`catch_up`), `chunk` at a time.

Guarantee: exact at any temperature, greedy equal to AR. Which drafts are verified depends on
the drafts alone (never on the target), and each position's randomness comes from its request's
key (`draft_verify.position_uniforms`), so every request's tokens have the target's
distribution; with a fixed gamma they are also independent of the slot and the neighbours
(tested). Under `select`, and under a host policy that varies gamma, a request's sampled tokens
depend on its neighbours (through the choice), but not their distribution.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from samplers import continuous
from samplers.continuous import ContinuousConfig, Slots
from samplers.core import draft_verify
from samplers.core.protocol import CausalModel


def catch_up(draft: CausalModel, draft_params, slots: Slots, chunk: int) -> Slots:
  """Feeds the draft every active slot's tokens it lacks, `chunk` per call, until it holds all
  but each slot's last two (the invariant a round starts from). No call when none lacks any.

  Writes past a slot's context land beyond its pointers and are overwritten before they are read;
  chunk <= G + 2 keeps them inside the cache."""
  want = jnp.maximum(slots.context - 2, slots.draft_length)
  lacking = lambda state: jnp.any(slots.active & (state[1] < want))

  def feed(state):
    cache, length = state
    positions = length[:, None] + jnp.arange(chunk)
    tokens = jnp.take_along_axis(slots.seq, positions, axis=1)
    _, cache = draft.apply(draft_params, tokens, positions, cache.replace(lengths=length))
    return cache, jnp.minimum(length + chunk, want)

  cache, length = jax.lax.while_loop(lacking, feed, (slots.draft_cache, slots.draft_length))
  return slots.replace(draft_cache=cache, draft_length=length)


def _verify(target: CausalModel, target_params, slots: Slots, drafts: jax.Array,
            width: int) -> tuple[jax.Array, object]:
  """The target's logits [S, G + 1, V] after each slot's last token and its first `width` drafts
  (zeros after them), and its cache."""
  context, gamma = slots.context, drafts.shape[1]
  window = context[:, None] - 1 + jnp.arange(width + 1)
  scored = jnp.concatenate([jnp.take_along_axis(slots.seq, window[:, :1], axis=1),
                            drafts[:, :width]], axis=1)
  logits, cache = target.apply(target_params, scored, window,
                               slots.cache.replace(lengths=context - 1))
  return jnp.pad(logits, ((0, 0), (0, gamma - width), (0, 0))), cache


def _round(target, target_params, draft, draft_params, slots: Slots, config: ContinuousConfig,
           gamma: int, choose) -> Slots:
  """One round: catch the draft up, draft gamma tokens per slot, let `choose(chain, slots) ->
  (lengths [S] in [0, gamma], verify(target_params, slots, drafts) -> (logits, cache))` say which
  to verify and how, verify, commit."""
  vocab, sampling = target.vocab_size, config.sampling
  slots = catch_up(draft, draft_params, slots, gamma + 2)  # gamma <= G: writes stay in the cache
  context, active = slots.context, slots.active
  noise, verify_u = draft_verify.round_noise(slots.keys, context, gamma, vocab, sampling.greedy)
  chain = draft_verify.draft_after(draft, draft_params, slots.seq, context, slots.draft_cache,
                                   noise, gamma, sampling)
  lengths, verify = choose(chain, slots)
  logits, cache = verify(target_params, slots, chain["drafts"])
  emitted, count = draft_verify.verify_chain(chain["drafts"], chain["q"], logits, verify_u,
                                             sampling, lengths)
  slots = slots.replace(
      cache=cache, draft_cache=chain["cache"],
      accepted=slots.accepted + jnp.sum(jnp.where(active, count, 0)),
      drafted=slots.drafted + jnp.sum(jnp.where(active, lengths, 0)),
      rejected=slots.rejected + jnp.sum(active & (count < lengths), dtype=jnp.int32))
  slots = continuous.commit(slots, emitted, count + 1, config)
  return slots.replace(draft_length=jnp.where(active, slots.context - 2, slots.draft_length))


def _check_gamma(gamma: int, config: ContinuousConfig) -> None:
  if not 1 <= gamma <= config.max_draft_tokens:
    raise ValueError(f"gamma must be in [1, max_draft_tokens = {config.max_draft_tokens}] (the "
                     f"room the slots were made with), got {gamma}")


@functools.partial(jax.jit,
                   static_argnames=("target", "draft", "config", "gamma", "rounds", "rows"),
                   donate_argnames=("slots",))
def speculate(target: CausalModel, target_params, draft: CausalModel, draft_params,
              slots: Slots, config: ContinuousConfig, gamma: int, rounds: int = 1,
              rows: int | None = None) -> Slots:
  """`rounds` rounds in which every active slot drafts gamma tokens (1 <= gamma <= G); with
  `rows`, only the first `rows` slots are computed (`continuous.on_rows`)."""
  _check_gamma(gamma, config)

  def choose(chain, slots):
    lengths = jnp.full(slots.n.shape, gamma, jnp.int32)
    return lengths, functools.partial(_verify, target, width=gamma)

  one = lambda _, s: _round(target, target_params, draft, draft_params, s, config, gamma, choose)
  return continuous.on_rows(lambda s: jax.lax.fori_loop(0, rounds, one, s), slots, rows)


def selection(confidence: jax.Array, active: jax.Array, budget: int,
              costs: jax.Array) -> tuple[jax.Array, jax.Array]:
  """TETRIS's choice of drafts to verify (module docstring).

  Args:
    confidence: [S, G] each draft's top probability under the draft.
    active: [S] bool slots holding a request.
    budget: the most drafts verified per round, over the batch.
    costs: [G + 1] float32 seconds of a round that verifies w drafts per slot, w = 0..G.
  Returns:
    (lengths [S] int32 in [0, width]: drafts verified per slot, width [] int32: the verify width,
    the w maximising (active slots + expected accepted drafts) / costs[w]).
  """
  slots, gamma = confidence.shape
  value = jnp.where(active[:, None], jnp.cumprod(confidence, axis=1), -1.0)  # [S, G]
  top = jax.lax.top_k(value.reshape(-1), min(budget, slots * gamma))[1]  # ties: earlier drafts
  chosen = jnp.zeros(slots * gamma, bool).at[top].set(True).reshape(slots, gamma)
  chosen &= active[:, None]
  lengths = jnp.sum(jnp.cumprod(chosen, axis=1), axis=1, dtype=jnp.int32)
  gain = jnp.sum(jnp.where(chosen, value, 0.0), axis=0)  # [G]: expected acceptances per column
  expected = jnp.sum(active) + jnp.concatenate([jnp.zeros(1), jnp.cumsum(gain)])  # [G + 1]
  width = jnp.argmax(expected / costs).astype(jnp.int32)
  return jnp.minimum(lengths, width), width


@functools.partial(jax.jit,
                   static_argnames=("target", "draft", "config", "budget", "rounds", "rows"),
                   donate_argnames=("slots",))
def select(target: CausalModel, target_params, draft: CausalModel, draft_params, slots: Slots,
           config: ContinuousConfig, budget: int, costs: jax.Array, rounds: int = 1,
           rows: int | None = None) -> Slots:
  """`rounds` TETRIS rounds: G = `config.max_draft_tokens` drafts per slot, the `budget` most
  likely verified at the width `selection` picks under `costs` [G + 1] (seconds per round that
  verifies w = 0..G drafts per slot; one compiled program, the width switched inside); with
  `rows`, only the first `rows` slots are computed (`continuous.on_rows`)."""
  gamma = config.max_draft_tokens
  _check_gamma(gamma, config)
  if budget < 1:
    raise ValueError(f"budget (drafts verified per round) must be >= 1, got {budget}")
  costs = jnp.asarray(costs, jnp.float32)
  if costs.shape != (gamma + 1,):
    raise ValueError(f"costs must hold one time per verify width 0..{gamma}, shape "
                     f"({gamma + 1},), got {costs.shape}")

  def choose(chain, slots):
    lengths, width = selection(chain["confidence"], slots.active, budget, costs)
    branches = [functools.partial(_verify, target, width=w) for w in range(gamma + 1)]
    return lengths, lambda *args: jax.lax.switch(width, branches, *args)

  one = lambda _, s: _round(target, target_params, draft, draft_params, s, config, gamma, choose)
  return continuous.on_rows(lambda s: jax.lax.fori_loop(0, rounds, one, s), slots, rows)

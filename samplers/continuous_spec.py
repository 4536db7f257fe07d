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
  confident slot gets a long chain, an unsure one a short one or none), and the verify width
  grows column by column while each raises the expected tokens per second under the measured
  costs (`samplers.draft_selection` has the choice). With
  a token-packed verify (`propose(..., sizes=)`, `verify_proposal(..., packed=True)`) a slot
  pays only for its own drafts: the call holds the chosen drafts alone, at one of a few packed
  sizes, so an unsure slot's short chain saves compute instead of padding to the width. With a
  dense verify, `propose(..., draft_step=)` also stops drafting where no deeper round could
  beat the best on offer (`keep_drafting`), so an unsure batch does not pay for G draft calls.

AR steps leave the draft's cache behind; a round first feeds it the tokens it lacks
(`catch_up`), in wide calls while a slot lags far, then `chunk` at a time.

Guarantee: exact at any temperature, greedy equal to AR. Whether a draft is made and verified
depends on the drafts before it alone (never on the target or on the draft itself:
`samplers.draft_selection`), and each position's randomness comes from its request's key
(`draft_verify.position_uniforms`), so every request's tokens have the target's distribution
(TETRIS with a binding budget or a packed verify: greedy only, see `draft_selection`). With a
fixed gamma they are also independent of the slot and the neighbours (tested). Under `select`,
and under a host policy that varies gamma, a request's sampled tokens depend on its neighbours
(through the choice), but not their distribution.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from samplers import continuous
from samplers.continuous import ContinuousConfig, Slots
from samplers.core import draft_verify, packing
from samplers.core.protocol import CausalModel
from samplers.draft_selection import costs_at_depth, keep_drafting, packed_selection, selection

CATCH_UP_WIDE = 32  # tokens per draft call while a slot lags far behind (`catch_up`)


def catch_up(draft: CausalModel, draft_params, slots: Slots, chunk: int,
             wide: int = CATCH_UP_WIDE) -> Slots:
  """Feeds the draft every active slot's tokens it lacks until it holds all but each slot's last
  two (the invariant a round starts from). No call when none lacks any.

  While some slot lacks more than `chunk` tokens (after AR steps: SmartSpec's gamma = 0 calls
  leave the draft one token behind per step), calls feed `wide` tokens per slot; then calls of
  `chunk` finish the rest. On the serve bench's pair, 8 slots 200 tokens behind catch up in
  17 ms with wide = 32 against 21 ms in 34 calls of 6.

  Writes past a slot's context land beyond its pointers and are overwritten before they are read;
  writes past the cache are dropped (`kv_cache.write_slots`), and reads past the tokens are
  clipped, so any width is safe."""
  want = jnp.maximum(slots.context - 2, slots.draft_length)
  lacking = lambda more: lambda state: jnp.any(slots.active & (state[1] + more < want))

  def feed(width):
    def call(state):
      cache, length = state
      positions = length[:, None] + jnp.arange(width)
      tokens = jnp.take_along_axis(slots.seq, positions, axis=1, mode="clip")
      _, cache = draft.apply(draft_params, tokens, positions, cache.replace(lengths=length))
      return cache, jnp.minimum(length + width, want)
    return call

  state = (slots.draft_cache, slots.draft_length)
  if wide > chunk:
    state = jax.lax.while_loop(lacking(chunk), feed(wide), state)
  cache, length = jax.lax.while_loop(lacking(0), feed(chunk), state)
  return slots.replace(draft_cache=cache, draft_length=length)


@jax.jit
def draft_lag(slots: Slots) -> jax.Array:
  """[] int32: the most tokens an active slot's draft cache lacks before a round (0 when none
  lacks any); the next round's `catch_up` feeds them."""
  lag = jnp.where(slots.active, slots.context - 2 - slots.draft_length, 0)
  return jnp.maximum(jnp.max(lag), 0)


@functools.partial(jax.jit, static_argnames=("draft", "chunk"), donate_argnames=("slots",))
def catch_up_from(draft: CausalModel, draft_params, slots: Slots, behind: int,
                  chunk: int) -> Slots:
  """`catch_up` of every slot's draft from `behind` tokens back (a cost model's measurement of
  what a round after AR steps pays first)."""
  lag_start = jnp.maximum(slots.context - 2 - behind, 0)
  return catch_up(draft, draft_params, slots.replace(draft_length=lag_start), chunk)


def _scored(slots: Slots, drafts: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Each slot's last token and `drafts` [S, W - 1]: (tokens [S, W], their positions [S, W])."""
  window = slots.context[:, None] - 1 + jnp.arange(drafts.shape[1] + 1)
  return jnp.concatenate([continuous.newest(slots)[:, None], drafts], axis=1), window


def _verify(target: CausalModel, target_params, slots: Slots, drafts: jax.Array,
            width: int) -> tuple[jax.Array, object]:
  """The target's logits [S, G + 1, V] after each slot's last token and its first `width` drafts
  (zeros after them), and its cache."""
  gamma = drafts.shape[1]
  scored, window = _scored(slots, drafts[:, :width])
  logits, cache = target.apply(target_params, scored, window,
                               slots.cache.replace(lengths=slots.context - 1))
  return jnp.pad(logits, ((0, 0), (0, gamma - width), (0, 0))), cache


def _draft_stage(draft, draft_params, slots: Slots, config: ContinuousConfig, gamma: int,
                 more=None):
  """Catches the draft up and drafts gamma tokens per slot (with `more`, as many as it says:
  `draft_verify.draft_after`): (slots with the draft's new cache, the chain {drafts [S, gamma],
  q, confidence [S, gamma], depth [], verify_u (the verify uniforms)}). The draft's vocabulary
  is the target's (`continuous.init` checks it)."""
  slots = catch_up(draft, draft_params, slots, gamma + 2)  # gamma <= G: writes stay in the cache
  noise, verify_u = draft_verify.round_noise(slots.keys, slots.context, gamma,
                                             draft.vocab_size, config.sampling.greedy)
  chain = draft_verify.draft_after(draft, draft_params, slots.seq, slots.context,
                                   slots.draft_cache, noise, gamma, config.sampling, more)
  slots = slots.replace(draft_cache=chain["cache"])
  keep = ("drafts", "q", "confidence", "depth")
  return slots, {k: chain[k] for k in keep} | {"verify_u": verify_u}


def _verify_stage(target, target_params, slots: Slots, config: ContinuousConfig, chain,
                  lengths: jax.Array, verify) -> Slots:
  """Verifies each slot's first `lengths` drafts of `chain` with one `verify(target_params, slots,
  drafts) -> (logits, cache)` call, counts and commits."""
  logits, cache = verify(target_params, slots, chain["drafts"])
  emitted, count = draft_verify.verify_chain(chain["drafts"], chain["q"], logits,
                                             chain["verify_u"], config.sampling, lengths)
  return verified(slots.replace(cache=cache), emitted, count, lengths, config)


def verified(slots: Slots, emitted: jax.Array, count: jax.Array, lengths: jax.Array,
             config: ContinuousConfig) -> Slots:
  """The slots after a verification that accepted `count` [S] of `lengths` [S] drafts and emits
  `emitted` [S, gamma + 1]: active slots' counters, the tokens committed, and the drafter marked
  holding all but each slot's last two tokens."""
  active = slots.active
  slots = slots.replace(
      accepted=slots.accepted + jnp.sum(jnp.where(active, count, 0)),
      drafted=slots.drafted + jnp.sum(jnp.where(active, lengths, 0)),
      rejected=slots.rejected + jnp.sum(active & (count < lengths), dtype=jnp.int32))
  slots = continuous.commit(slots, emitted, count + 1, config)
  return slots.replace(draft_length=jnp.where(active, slots.context - 2, slots.draft_length))


def _round(target, target_params, draft, draft_params, slots: Slots, config: ContinuousConfig,
           gamma: int, choose) -> Slots:
  """One round: catch the draft up, draft gamma tokens per slot, let `choose(chain, slots) ->
  (lengths [S] in [0, gamma], verify(target_params, slots, drafts) -> (logits, cache))` say which
  to verify and how, verify, commit."""
  slots, chain = _draft_stage(draft, draft_params, slots, config, gamma)
  lengths, verify = choose(chain, slots)
  return _verify_stage(target, target_params, slots, config, chain, lengths, verify)


def check_gamma(gamma: int, config: ContinuousConfig) -> None:
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
  check_gamma(gamma, config)

  def choose(chain, slots):
    lengths = jnp.full(slots.n.shape, gamma, jnp.int32)
    return lengths, functools.partial(_verify, target, width=gamma)

  one = lambda _, s: _round(target, target_params, draft, draft_params, s, config, gamma, choose)
  return continuous.on_rows(lambda s: jax.lax.fori_loop(0, rounds, one, s), slots, rows)


def _check_selection(config: ContinuousConfig, budget: int, costs,
                     sizes: tuple[int, ...] | None = None) -> jax.Array:
  """TETRIS's settings (`select`, `propose`), named when wrong; the costs as float32."""
  gamma = config.max_draft_tokens
  check_gamma(gamma, config)
  if budget < 1:
    raise ValueError(f"budget (drafts verified per round) must be >= 1, got {budget}")
  costs = jnp.asarray(costs, jnp.float32)
  if sizes is not None:
    if not sizes or list(sizes) != sorted(set(sizes)) or sizes[0] < 1:
      raise ValueError(f"sizes (tokens per packed verify call) must be increasing and >= 1, "
                       f"got {sizes}")
    if costs.shape != (len(sizes),):
      raise ValueError(f"costs must hold one time per packed size {sizes}, shape "
                       f"({len(sizes)},), got {costs.shape}")
  elif costs.shape != (gamma + 1,):
    raise ValueError(f"costs must hold one time per verify width 0..{gamma}, shape "
                     f"({gamma + 1},), got {costs.shape}")
  return costs


def _verify_packed(target: CausalModel, target_params, slots: Slots, drafts: jax.Array,
                   lengths: jax.Array, size: int) -> tuple[jax.Array, object]:
  """The target's logits [S, G + 1, V] after each active slot's last token and its first
  `lengths` drafts (zeros after them), from one call on those tokens packed into `size`
  (`CausalModel.apply_packed`; padding after them), and its cache."""
  width = drafts.shape[1] + 1
  scored, window = _scored(slots, drafts)
  packed = packing.pack(jnp.where(slots.active, lengths + 1, 0), size, width)
  logits, cache = target.apply_packed(target_params, packed.gather(scored)[None],
                                      packed.gather(window)[None], packed.rows, packed.offsets,
                                      width, slots.cache.replace(lengths=slots.context - 1))
  return packed.scatter(logits[0], width), cache


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
  costs = _check_selection(config, budget, costs)

  def choose(chain, slots):
    lengths, width = selection(chain["confidence"], slots.active, budget, costs)
    branches = [functools.partial(_verify, target, width=w) for w in range(gamma + 1)]
    return lengths, lambda *args: jax.lax.switch(width, branches, *args)

  one = lambda _, s: _round(target, target_params, draft, draft_params, s, config, gamma, choose)
  return continuous.on_rows(lambda s: jax.lax.fori_loop(0, rounds, one, s), slots, rows)


@functools.partial(jax.jit, static_argnames=("draft", "config", "budget", "rows", "sizes"),
                   donate_argnames=("slots",))
def propose(draft: CausalModel, draft_params, slots: Slots, config: ContinuousConfig,
            budget: int, costs: jax.Array, rows: int | None = None,
            calibration: jax.Array | float = 1.0, sizes: tuple[int, ...] | None = None,
            draft_step: jax.Array | float | None = None, depth: jax.Array | int = 0):
  """The first half of a `select` round as its own program: draft G tokens per slot and choose
  which to verify (`selection` under `calibration`; with `sizes`, `packed_selection`, costs one
  per size). Returns (slots, proposal: the chain with `lengths` [S], `width` [] (with `sizes`:
  the chosen size's index), and `chosen` [] drafts with `confidence_sum` [] top probabilities).

  With `draft_step` (seconds per draft call; dense only), the drafts stop where
  `keep_drafting` says, or after `depth` drafts if `depth` > 0 (a cost measurement), and the
  width is chosen under `costs_at_depth`: `costs` then price rounds that drafted all G.

  With `verify_proposal`, a round is two programs and the host reads `width` in between, so the
  target call is compiled per width: inside `select`, `lax.switch` hands the target's cache
  through a conditional, which XLA:CPU copies (2.6 of 18.7 ms of a round on 8 slots of the
  bench's pair)."""
  gamma = config.max_draft_tokens
  costs = _check_selection(config, budget, costs, sizes)
  if sizes is not None and sizes[0] < (rows or config.num_slots):
    raise ValueError(f"sizes: the smallest packed call ({sizes[0]} tokens) must hold every "
                     f"slot's last token ({rows or config.num_slots} rows)")

  if sizes is not None and draft_step is not None:
    raise ValueError("draft_step (an adaptive draft depth) is for dense verifies; pass "
                     "sizes=None or draft_step=None")

  def stage(s):
    more = None
    if draft_step is not None:
      rule = keep_drafting(s.active, costs, draft_step, calibration)
      more = lambda i, confidence: jnp.where(depth > 0, i < depth, rule(i, confidence))
    s, chain = _draft_stage(draft, draft_params, s, config, gamma, more)
    if sizes is None:
      priced = costs if draft_step is None else costs_at_depth(costs, draft_step, chain["depth"])
      lengths, width = selection(chain["confidence"], s.active, budget, priced, calibration,
                                 chain["depth"])
    else:
      lengths, width = packed_selection(chain["confidence"], s.active, budget, sizes, costs,
                                        calibration)
    chosen = jnp.arange(gamma) < lengths[:, None]
    return s, chain | {"lengths": lengths, "width": width, "chosen": jnp.sum(chosen),
                       "confidence_sum": jnp.sum(jnp.where(chosen, chain["confidence"], 0.0))}

  return continuous.on_rows_with(stage, slots, rows)


@functools.partial(jax.jit, static_argnames=("target", "config", "width", "rows", "packed"),
                   donate_argnames=("slots",))
def verify_proposal(target: CausalModel, target_params, slots: Slots, config: ContinuousConfig,
                    proposal, width: int, rows: int | None = None, packed: bool = False) -> Slots:
  """The second half: one target call over each slot's last token and `width` drafts
  (`int(proposal["width"])`), verification of the chosen ones and commit. With `packed`, the
  call is token-packed (`_verify_packed`) and `width` is its size in tokens."""
  verify = functools.partial(_verify, target, width=width)
  if packed:
    verify = lambda params, s, drafts: _verify_packed(target, params, s, drafts,
                                                      proposal["lengths"], width)
  return continuous.on_rows(
      lambda s: _verify_stage(target, target_params, s, config, proposal, proposal["lengths"],
                              verify), slots, rows)

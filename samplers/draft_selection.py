"""TETRIS's choice of drafts to verify (Wu et al. 2025, "TETRIS: Optimal Draft Token Selection
for Batch Speculative Decoding"), as functions of the draft's confidences and the measured costs
alone, for `samplers.continuous_spec`'s rounds.

* `chain_values`: the draft's estimate that each slot's j-th draft is accepted;
* `selection` (dense verify) and `packed_selection` (token-packed verify): which drafts, under a
  budget, at which verify width or packed size;
* `keep_drafting` and `costs_at_depth`: the adaptive draft depth, drafting one column at a time
  while a deeper round could still beat the best on offer.

Exactness: a draft at column j may be verified or not depending on the chain values of columns
<= j only (they depend on the drafts before column j). `keep_drafting` and the dense width are
stopping rules of that kind; a binding budget and the packed size rank drafts against later
ones of the same slot, which keeps greedy decoding exact but not sampled decoding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def chain_values(confidence: jax.Array, active: jax.Array,
                 calibration: jax.Array | float = 1.0) -> jax.Array:
  """[S, G] the estimated probability that each slot's j-th draft is accepted: the product of
  min(1, calibration x top probability) along the chain; -1 on free slots."""
  per_draft = jnp.minimum(1.0, calibration * confidence)
  return jnp.where(active[:, None], jnp.cumprod(per_draft, axis=1), -1.0)


def _likeliest(value: jax.Array, active: jax.Array, count) -> jax.Array:
  """[S, G] bool: the `count` drafts of highest chain value over the batch (ties: earlier
  drafts), on active slots. Chain values fall along a chain, so each slot's are a prefix."""
  slots, gamma = value.shape
  order = jax.lax.top_k(value.reshape(-1), slots * gamma)[1]
  chosen = jnp.zeros(slots * gamma, bool).at[order].set(jnp.arange(slots * gamma) < count)
  return chosen.reshape(slots, gamma) & active[:, None]


def selection(confidence: jax.Array, active: jax.Array, budget: int, costs: jax.Array,
              calibration: jax.Array | float = 1.0,
              limit: jax.Array | int | None = None) -> tuple[jax.Array, jax.Array]:
  """TETRIS's choice of drafts to verify (module docstring).

  Args:
    confidence: [S, G] each draft's top probability under the draft.
    active: [S] bool slots holding a request.
    budget: the most drafts verified per round, over the batch.
    costs: [G + 1] float32 seconds of a round that verifies w drafts per slot, w = 0..G.
    calibration: [] float32 scale of the top probabilities (`chain_values`), e.g. the observed
      ratio of accepted to expected drafts; 1 trusts the draft.
    limit: the most columns that may be verified (the drafts made); None: G.
  Returns:
    (lengths [S] int32 in [0, width]: drafts verified per slot, width [] int32: the verify width,
    the columns verified while each raises (active slots + expected accepted drafts) / costs[w].)

  The width is a stopping rule, not an argmax over all widths: column j is verified when every
  column up to j raised the ratio, which reads the chain values of columns <= j only, and those
  depend on the drafts before column j, never on its own draft. An argmax would read the value
  of column j + 1, which depends on draft j, so whether draft j is verified would depend on
  draft j itself and sampled tokens would not keep the target's distribution. Chain values fall
  along a chain, so under costs that rise by a constant step (the fitted ones) the two agree.
  """
  value = chain_values(confidence, active, calibration)  # [S, G]
  chosen = _likeliest(value, active, budget)
  lengths = jnp.sum(jnp.cumprod(chosen, axis=1), axis=1, dtype=jnp.int32)
  gain = jnp.sum(jnp.where(chosen, value, 0.0), axis=0)  # [G]: expected acceptances per column
  ratio = _expected(jnp.sum(active), gain) / costs  # [G + 1]
  gamma = gain.shape[0]
  pays = (ratio[1:] > ratio[:-1]) & (jnp.arange(gamma) < (gamma if limit is None else limit))
  width = jnp.sum(jnp.cumprod(pays), dtype=jnp.int32)
  return jnp.minimum(lengths, width), width


def _expected(live: jax.Array, gain: jax.Array) -> jax.Array:
  """[G + 1] expected tokens of a round verifying w = 0..G columns: each of the `live` slots'
  own token plus the expected acceptances `gain` [G] of the columns verified."""
  return live + jnp.concatenate([jnp.zeros(1), jnp.cumsum(gain)])


def packed_selection(confidence: jax.Array, active: jax.Array, budget: int,
                     sizes: tuple[int, ...], costs: jax.Array,
                     calibration: jax.Array | float = 1.0) -> tuple[jax.Array, jax.Array]:
  """TETRIS's choice for a token-packed verify call (`_verify_packed`), where a slot pays only
  for its own drafts: the b drafts most likely accepted across the batch, b at most `budget` and
  as many as a call of one of `sizes` tokens holds beside the active slots' last tokens, the
  size maximising (active slots + expected accepted drafts) / its cost.

  Args:
    confidence, active, calibration: as `selection`; costs: [K] seconds of a packed call of
      sizes[k] tokens (sizes increasing, the first at least the active slots).
  Returns:
    (lengths [S] int32 drafts verified per slot, k [] int32 the chosen size's index).
  """
  gamma = confidence.shape[1]
  value = chain_values(confidence, active, calibration)
  ranked = -jnp.sort(-value.reshape(-1))  # descending
  live = jnp.sum(active)
  expected = jnp.concatenate([jnp.zeros(1), jnp.cumsum(jnp.maximum(ranked, 0.0))])
  drafts = jnp.clip(jnp.asarray(sizes) - live, 0, jnp.minimum(budget, live * gamma))  # [K]
  fits = jnp.asarray(sizes) >= live  # room for every active slot's last token
  k = jnp.argmax(jnp.where(fits, (live + expected[drafts]) / costs, -1.0)).astype(jnp.int32)
  chosen = _likeliest(value, active, drafts[k])
  return jnp.sum(jnp.cumprod(chosen, axis=1), axis=1, dtype=jnp.int32), k


def costs_at_depth(costs: jax.Array, draft_step, depth) -> jax.Array:
  """[G + 1] seconds of a round that drafted `depth` tokens per slot and verifies w = 0..G, from
  `costs` (the same with G drafted) less the draft calls not made; widths past `depth`: inf."""
  widths = jnp.arange(costs.shape[0])
  return jnp.where(widths <= depth, costs - (costs.shape[0] - 1 - depth) * draft_step, jnp.inf)


def keep_drafting(active: jax.Array, costs: jax.Array, draft_step, calibration=1.0):
  """TETRIS's draft depth: `more(i, confidence) -> [] bool` for `draft_verify.draft_after`.

  After i drafts per slot, the best round on offer verifies some w <= i drafts, at R =
  (active slots + expected accepted drafts) / costs_at_depth(i)[w]. A deeper column costs one
  draft call and one verify column, at least u = draft_step + the least step of `costs` from
  width i on, and adds at most g = the expected acceptances of column i - 1 (chain values fall
  along a chain). So when g / u <= R no deeper round (any depth, any width) beats R, and
  drafting stops: an unsure batch stops after a draft or two instead of paying for G draft
  calls it would not verify. Column gains sum every slot's chain values (the budget binds in
  `selection` only).

  Args: active [S] bool; costs [G + 1] seconds per round verifying w drafts after G drafted;
  draft_step [] seconds per draft call; calibration as in `chain_values`."""
  live, gamma = jnp.sum(active), costs.shape[0] - 1

  def more(i, confidence):
    gain = jnp.sum(jnp.maximum(chain_values(confidence, active, calibration), 0.0), axis=0)
    expected = _expected(live, gain)  # [G + 1]
    best = jnp.max(expected / costs_at_depth(costs, draft_step, i))
    column = jnp.min(jnp.where(jnp.arange(gamma) >= i, jnp.diff(costs), jnp.inf))
    return gain[i - 1] > best * jnp.maximum(draft_step + column, 0.0)

  return more

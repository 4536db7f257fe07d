"""Any-Subset Speculative Decoding (ASSD) of an any-subset autoregressive model (AS-ARM; Guo and
Ermon 2025, "Reviving Any-Subset Autoregressive Models with Principled Parallel Sampling and
Speculative Decoding").

The masked positions are generated in an order s (left to right, or a random permutation per
row). Each round takes the next g positions s(1..g): one pass with equal ranks gives independent
drafts x~_j ~ q_j = p(x_s(j) | visible); a second pass with ranks 0..g-1 (and rank g for the next
position s(g+1)) gives the exact conditionals p_j = p(x_s(j) | visible, x~_s(<j)), and the
speculative rule (`samplers.core.verify.single_draft`) accepts drafts until the first rejection, which
emits a token from the residual norm(max(0, p_j - q_j)); when all g are accepted the bonus token
is drawn from p_{g+1}.

With `reuse_drafts` a round makes one model call instead of two: the verification pass also
ranks every masked position outside the window after the whole window, and the next round drafts
from these conditionals (and, for window positions left after a rejection, from their verify
conditionals) instead of from a fresh equal-rank pass. The drafts then condition on the previous
round's drafts, which may have been rejected, so q_1 = p_1 no longer holds; when the model is
confident the drafts are right and each call commits up to g + 1 tokens.

Guarantee (Guo and Ermon 2025, any-subset speculative decoding): the output follows the model's joint under the order s exactly, for
any model meeting `AnySubsetModel`, whatever the drafts (speculative verification is exact for
any proposal fixed before its draw, here one computed from earlier rounds). Without reuse, since
q_1 = p_1 the first draft is always accepted, so a round (two model calls) commits at least two
tokens while two or more remain; with reuse a round (one call, plus one call to start) commits
at least one. Either way model calls never exceed tokens generated + 1, and without reuse they
never exceed tokens generated.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from samplers.core import canvas as canvas_lib
from samplers.core import rng, verify
from samplers.core.denoiser_protocol import AnySubsetModel
from samplers.core.logits import SamplingParams, probs
from samplers.core.protocol import SampleOutput
from samplers.spec import SamplerSpec

ORDERS = ("left_to_right", "random")
ORDER_STREAM = 2**31 - 1  # fold_in index of a row's random order (rounds use n < max_len)


@dataclasses.dataclass(frozen=True)
class ASSDConfig:
  """Attributes:
    num_draft_tokens: g >= 1 positions drafted per round.
    order: one of ORDERS, the generation order over the masked positions.
    sampling: the sampling transform applied to both the drafts and the exact conditionals.
    reuse_drafts: draft each round from the previous round's verification pass (one model call
      per round) instead of a fresh equal-rank pass (two calls per round).
  """

  num_draft_tokens: int = 4
  order: str = "left_to_right"
  sampling: SamplingParams = SamplingParams()
  reuse_drafts: bool = False

  def __post_init__(self):
    if self.num_draft_tokens < 1:
      raise ValueError(f"num_draft_tokens must be >= 1, got {self.num_draft_tokens}")
    if self.order not in ORDERS:
      raise ValueError(f"order {self.order!r} is unknown; valid: {', '.join(ORDERS)}")


def generation_order(canvas: jax.Array, mask_id: int, order: str, keys: jax.Array) -> jax.Array:
  """[B, L] int32 positions: the masked ones first, in generation order, then the others."""
  length = canvas.shape[1]
  masked = canvas == mask_id
  if order == "random":
    priority = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, ORDER_STREAM), (length,)))(keys)
  else:
    priority = jnp.broadcast_to(jnp.arange(length, dtype=jnp.float32), canvas.shape) / length
  return jnp.argsort(jnp.where(masked, priority, 2.0), axis=-1, stable=True).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "config"))
def sample(model: AnySubsetModel, params, canvas: jax.Array, key: jax.Array,
           config: ASSDConfig) -> SampleOutput:
  """Fills every mask of `canvas` [B, L] by any-subset speculative decoding.

  Args:
    model: a hashable `AnySubsetModel` (static); params: its parameters.
    canvas: [B, L] int32 with mask ids where tokens are generated.
    key: one key or one per row; a round of a row that has committed n tokens uses
      fold_in(row_key, n); a random order uses fold_in(row_key, ORDER_STREAM).
    config: static `ASSDConfig`.
  Returns:
    SampleOutput with the completed canvas; stats `model_calls` (2 per round; with reuse 1 per
    round + 1), `rounds`,
    `generated_tokens`, `tokens_per_call`, `acceptance` (accepted drafts / drafts verified,
    without reuse after the first of each round).
  """
  canvas_lib.check_model(model, canvas)
  batch, length = canvas.shape
  g, vocab = config.num_draft_tokens, model.vocab_size
  keys = rng.row_keys(key, batch)
  canvas = canvas.astype(jnp.int32)
  order = generation_order(canvas, model.mask_id, config.order, keys)
  total = jnp.sum(canvas == model.mask_id, axis=1).astype(jnp.int32)  # [B]
  rows = jnp.arange(batch)[:, None]
  window = jnp.arange(g + 1)[None, :]

  def dist(logits):
    return probs(logits.astype(jnp.float32).at[..., model.mask_id].set(-jnp.inf), config.sampling)

  def draft_pass(tokens, positions, target):
    """Draft distributions [B, g + 1, V] of the window: each given only the visible tokens."""
    unseen = jnp.int32(g + 1)  # ranks of masked positions outside the window: nobody sees them
    ranks = jnp.where(tokens == model.mask_id, unseen, -1).at[rows, target].set(0, mode="drop")
    return jnp.take_along_axis(dist(model.conditionals(params, tokens, ranks)),
                               positions[..., None], axis=1)

  def body(state):
    tokens, done, rounds, accepted, tried, drafts_from = state
    slots = done[:, None] + window  # [B, g + 1] indices into the order
    live = slots < total[:, None]  # window entries that exist (the last one is the bonus)
    positions = jnp.take_along_axis(order, jnp.minimum(slots, length - 1), axis=1)
    u = canvas_lib.step_uniforms(keys, done, (g + 1, 2 * vocab + 1))
    target = jnp.where(live, positions, length)  # scatter index; non-live entries are dropped
    if config.reuse_drafts:
      q = jnp.take_along_axis(drafts_from, positions[..., None], axis=1)  # [B, g + 1, V]
    else:
      q = draft_pass(tokens, positions, target)
    drafts = canvas_lib.draw_tokens(u[..., :vocab], q, config.sampling)
    proposal = tokens.at[rows, target].set(drafts, mode="drop")
    # window ranks 0..g; every other masked position ranks after the window (sees all of it)
    verify_rank = jnp.where(tokens == model.mask_id, g + 1, -1).at[rows, target].set(
        jnp.broadcast_to(window, positions.shape), mode="drop")
    p_all = dist(model.conditionals(params, proposal, verify_rank))  # [B, L, V]
    p = jnp.take_along_axis(p_all, positions[..., None], axis=1)
    ok, emitted = jax.vmap(jax.vmap(verify.single_draft))(u[..., vocab:], p, q, drafts)
    checked = live[:, :g]
    lead = jnp.sum(jnp.cumprod(ok[:, :g] & checked, axis=1), axis=1)  # accepted drafts
    remaining = total - done
    # accepted drafts, then the residual token at the first rejection or the bonus token
    # (a draw from p_{g+1}) when all g were accepted
    bonus = canvas_lib.draw_tokens(u[:, g:, vocab + 1:], p[:, g:], config.sampling)[:, 0]
    last = jnp.where(lead < g, jnp.take_along_axis(emitted, jnp.minimum(lead, g - 1)[:, None],
                                                     axis=1)[:, 0], bonus)
    take = jnp.minimum(lead + 1, remaining)
    values = jnp.where(window < lead[:, None], proposal[rows, positions], last[:, None])
    write = (window < take[:, None]) & live
    tokens = tokens.at[rows, jnp.where(write, positions, length)].set(values, mode="drop")
    # without reuse the first draft of a round is always accepted (q_1 = p_1): count the others
    free = 0 if config.reuse_drafts else 1
    verified = jnp.minimum(jnp.sum(checked, axis=1), lead + 1) - free
    return (tokens, done + take, rounds + 1, accepted + jnp.sum(jnp.maximum(lead - free, 0)),
            tried + jnp.sum(jnp.maximum(verified, 0)), p_all if config.reuse_drafts else drafts_from)

  done = jnp.zeros((batch,), jnp.int32)
  if config.reuse_drafts:  # the first round's drafts: one equal-rank pass over every mask
    everything = jnp.where(canvas == model.mask_id, 0, -1)
    first = dist(model.conditionals(params, canvas, everything))
  else:
    first = jnp.zeros((batch, 0, vocab), jnp.float32)  # unused
  state = (canvas, done, jnp.int32(0), jnp.int32(0), jnp.int32(0), first)
  tokens, _, rounds, accepted, tried, _ = jax.lax.while_loop(
      lambda s: jnp.any(s[1] < total), body, state)
  calls = rounds + 1 if config.reuse_drafts else 2 * rounds
  return canvas_lib.output(canvas, tokens, model.mask_id, calls, rounds=rounds,
                           acceptance=accepted / jnp.maximum(tried, 1).astype(jnp.float32))


@dataclasses.dataclass(frozen=True)
class ASSDOptions:
  """`sampler.*` settings of kind "assd" (an any-subset AR model, model.kind=asarm).

  Attributes:
    num_draft_tokens: positions drafted and verified per round.
    order: the generation order, one of ORDERS.
    reuse_drafts: draft each round from the previous round's verification pass (one model call
      per round instead of two; still exact).
  """

  num_draft_tokens: int = 4
  order: str = "left_to_right"
  reuse_drafts: bool = False


SPEC = SamplerSpec(
    "assd", ASSDOptions, sample,
    lambda o, decode: ASSDConfig(o.num_draft_tokens, o.order, decode.sampling, o.reuse_drafts),
    model="any_subset")

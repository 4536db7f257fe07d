"""`AnySubsetARM`: an any-subset autoregressive model (AS-ARM) on the Llama blocks.

Two-stream attention (XLNet, Yang et al. 2019; sigma-GPT, Pannatier et al. 2024), written as one
pass of the unchanged `models.llama.Transformer` over 2T tokens under a custom mask, with shared
weights for both streams:

- content stream (tokens 0..T-1): the tokens themselves; position j sees content k when
  rank[k] <= rank[j] (visible positions have rank -1 and see each other);
- query stream (tokens T..2T-1): the mask token at the same positions (it carries no token);
  query i sees content k when rank[k] < rank[i], and itself (so that a query with nothing to see
  still has one key, which holds no token).

Query i's logits therefore depend only on the tokens of rank < rank[i]: one pass gives the
independent predictions of every masked position (all ranks 0) or the exact chain-rule factors of
a proposal (ranks 0..g-1), as `samplers.core.denoiser_protocol.AnySubsetModel` requires. Nothing can
leak: a content state at rank r mixes only tokens of rank <= r, and a query of rank r only reads
content states of rank < r.

Training (`loss`): per row a uniformly random order of the L positions and a uniformly random
number c in [0, L) of visible ones (the first c of the order, rank -1); the rest get ranks 0..L-c-1
in that order, and the loss is the mean cross-entropy of those L - c tokens (one pass).
`eval_nll` uses c = 0: the exact nll of the sequence under a random order's chain rule (a proper
distribution for each order, so not a bound), averaged over rows and orders. With
`model.diffusion.response_after` (`models.conditioning`) the prompt positions are always visible
and only the response positions are ordered (and counted): a model of the response given its
prompt.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from models import conditioning
from models.base import TransformerModel
from models.diffusion import reject_teacher, sequence_positions
from models.losses import next_token_nll


def two_stream_mask(ranks: jax.Array) -> jax.Array:
  """ranks [B, T] int32 (-1 visible) -> [B, 2T, 2T] bool over [content (T), query (T)]."""
  steps = ranks.shape[1]
  content = ranks[:, None, :] <= ranks[:, :, None]
  query = ranks[:, None, :] < ranks[:, :, None]
  itself = jnp.broadcast_to(jnp.eye(steps, dtype=bool), content.shape)
  top = jnp.concatenate([content, jnp.zeros_like(content)], axis=2)
  bottom = jnp.concatenate([query, itself], axis=2)
  return jnp.concatenate([top, bottom], axis=1)


@dataclasses.dataclass(frozen=True)
class AnySubsetARM(TransformerModel):
  """Any-subset AR model (`config.kind` "asarm") meeting `AnySubsetModel`."""

  def conditionals(self, params, tokens: jax.Array, ranks: jax.Array) -> jax.Array:
    """tokens, ranks [B, T] int32 -> [B, T, V] float32 log-probabilities; at a position with
    rank r >= 0, log p(x_i | x_j for rank[j] < r), the mask token excluded. Positions of equal
    rank do not see each other. Rows at visible positions are unspecified."""
    positions = sequence_positions(tokens)
    both = jnp.concatenate([tokens, jnp.full_like(tokens, self.mask_id)], axis=1)
    logits = self.module.apply({"params": params}, both,
                               jnp.concatenate([positions, positions], axis=1),
                               two_stream_mask(ranks))[:, tokens.shape[1]:]
    logits = jnp.where(jnp.arange(self.vocab_size) == self.mask_id, -jnp.inf, logits)
    return jax.nn.log_softmax(logits)

  # ------------------------------------------------------------------ training interface

  @staticmethod
  def random_ranks(key: jax.Array, orderable: jax.Array, visible: bool) -> jax.Array:
    """[B, L] ranks: per row, the positions not `orderable` ([B, L] bool) are visible (-1) and
    the orderable ones take a uniformly random order; with `visible`, the first c ~ U{0..R-1} of
    the R orderable positions are visible too, and the rest are ranked 0, 1, ... after them."""
    order_key, count_key = jax.random.split(key)
    score = jax.random.uniform(order_key, orderable.shape) - 2.0 * ~orderable  # fixed ones first
    steps = jnp.argsort(jnp.argsort(score, axis=-1), axis=-1).astype(jnp.int32)
    fixed = jnp.sum(~orderable, axis=-1, keepdims=True, dtype=jnp.int32)
    count = fixed
    if visible:
      free = orderable.shape[1] - fixed
      count += jnp.floor(jax.random.uniform(count_key, fixed.shape) * free).astype(jnp.int32)
    return jnp.where(steps < count, -1, steps - count)

  def _nll(self, params, tokens: jax.Array, ranks: jax.Array) -> jax.Array:
    """[B, L] cross-entropy of every token under `ranks` (meaningful where rank >= 0)."""
    return next_token_nll(self.conditionals(params, tokens, ranks), tokens)

  def loss(self, params, batch: jax.Array, key: jax.Array, teacher_logits: jax.Array | None = None,
           distill_weight: float = 1.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean cross-entropy of the ranked tokens of the first L tokens of batch [B, L + 1] under a
    random visible subset and order per row."""
    del distill_weight
    reject_teacher(teacher_logits)
    tokens = batch[:, :-1]
    ranks = self.random_ranks(key, self._orderable(tokens), visible=True)
    ranked = ranks >= 0
    nll = self._nll(params, tokens, ranks)
    loss = jnp.sum(jnp.where(ranked, nll, 0.0)) / jnp.maximum(jnp.sum(ranked), 1)
    return loss, {"visible_rate": 1.0 - jnp.mean(ranked.astype(jnp.float32))}

  def eval_nll(self, params, batch: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(summed nll in nats, token count) of the first L tokens of batch [B, L + 1] (of their
    responses given the prompts, when conditional), each row factorised in a random order (exact
    for that order)."""
    tokens = batch[:, :-1]
    orderable = self._orderable(tokens)
    nll = self._nll(params, tokens, self.random_ranks(key, orderable, visible=False))
    return jnp.sum(jnp.where(orderable, nll, 0.0)), jnp.sum(orderable).astype(jnp.float32)

  def _orderable(self, tokens: jax.Array) -> jax.Array:
    return conditioning.noisable(tokens, self.config.diffusion.response_after)

  @staticmethod
  def teacher_inputs(batch: jax.Array) -> jax.Array:
    """Distillation is for causal models; `loss` rejects teacher logits."""
    return batch[:, :-1]

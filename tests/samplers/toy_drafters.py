"""Drafters for toy causal models: Medusa heads (`samplers.medusa`), an EAGLE-style feature head
(`samplers.eagle`) and a denoiser (`samplers.diffusion_drafted`).

`WithHeads(base, K)` meets the causal protocol through `base` and adds `apply_with_heads`: head k's
logits after a token are a table row `heads[token, k]` (params {"base": ..., "heads": [V, K, V]}),
so the drafts vary with the context and can be made good or bad at will; the sampler's exactness
must not depend on them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from tests.samplers.toy import TrigramLM


@dataclasses.dataclass(frozen=True)
class OnBase:
  """A causal toy `base` (its params under "base") that a drafter extends."""

  base: Any

  @property
  def vocab_size(self) -> int:
    return self.base.vocab_size

  @property
  def max_len(self) -> int:
    return self.base.max_len

  def init_cache(self, batch: int, max_len: int | None = None):
    return self.base.init_cache(batch, max_len)

  def apply(self, params, tokens, positions, cache, attention_mask=None):
    return self.base.apply(params["base"], tokens, positions, cache, attention_mask)


@dataclasses.dataclass(frozen=True)
class WithHeads(OnBase):
  num_medusa_heads: int = 1

  def apply_with_heads(self, params, tokens, positions, cache, attention_mask=None):
    logits, cache = self.apply(params, tokens, positions, cache, attention_mask)
    return logits, params["heads"][tokens], cache

  def random_heads(self, key: jax.Array, scale: float = 2.0) -> jax.Array:
    shape = (self.vocab_size, self.num_medusa_heads, self.vocab_size)
    return scale * jax.random.normal(key, shape, jnp.float32)


@dataclasses.dataclass(frozen=True)
class WithFeatureHead(OnBase):
  """`base` (params {"base": ...}) with an EAGLE-style head (params {"head": [V, V, V]}).

  The target's feature at a position is the one-hot of its token. The head's logits for the
  token after a pair (f_t, x_{t+1}) are head[argmax f_t, x_{t+1}] plus head[x_t, x_{t+1}] with
  x_t read from the head's own cache (a `toy.TrigramLM` over the pairs' tokens): with the
  target's trigram table as `head`, both terms are the target's logits, so the drafts are right
  exactly when the sampler hands the head the right features and keeps its cache right. Its
  predicted feature is the one-hot of x_{t+1}, the true one.
  """

  def apply_with_features(self, params, tokens, positions, cache, attention_mask=None):
    logits, cache = self.apply(params, tokens, positions, cache, attention_mask)
    return logits, jax.nn.one_hot(tokens, self.vocab_size), cache

  def init_draft_cache(self, batch: int, max_len: int | None = None):
    return self._pairs.init_cache(batch, max_len)

  def draft(self, params, features, tokens, positions, cache, attention_mask=None, rows=None):
    from_cache, cache = self._pairs.apply(params["head"], tokens, positions, cache,
                                          attention_mask)
    from_features = params["head"][jnp.argmax(features, axis=-1), tokens]
    return (at_rows(from_cache + from_features, rows),
            at_rows(jax.nn.one_hot(tokens, self.vocab_size), rows), cache)

  @property
  def _pairs(self) -> TrigramLM:
    return TrigramLM(self.vocab_size, self.max_len)


def at_rows(outputs: jax.Array, rows: jax.Array | None) -> jax.Array:
  """A head's [B, T, ...] outputs at `rows` [B, R] (the `draft(..., rows=)` protocol), or all."""
  if rows is None:
    return outputs
  return jnp.take_along_axis(outputs, rows.reshape(*rows.shape, *[1] * (outputs.ndim - 2)), 1)


@dataclasses.dataclass(frozen=True)
class NearestTokenDenoiser:
  """A toy masked-diffusion denoiser (`samplers.core.denoiser_protocol.Denoiser`): the logits
  at a masked position are `params[x, d]` ([V, D, V]) for the nearest visible token x on its left
  at distance d (clipped to D - 1; x = 0 when none). SUBS: a visible position keeps its token,
  the mask is never predicted. Its marginals depend on the prefix, which is all a drafter for a
  causal target needs to be tested with."""

  vocab_size: int
  max_len: int
  mask_id: int
  block_size: int = 0

  def denoise(self, params, tokens):
    index = jnp.arange(tokens.shape[1])[None, :]
    visible = tokens != self.mask_id
    last = jax.lax.cummax(jnp.where(visible, index, -1), axis=1)
    nearest = jnp.where(last >= 0, jnp.take_along_axis(tokens, jnp.clip(last, 0), axis=1), 0)
    distance = jnp.clip(index - last, 0, params.shape[1] - 1)
    logits = params[nearest, distance]
    own = jax.nn.one_hot(tokens, self.vocab_size, dtype=bool)
    logits = jnp.where(visible[..., None], jnp.where(own, 0.0, -jnp.inf), logits)
    return logits.at[..., self.mask_id].set(-jnp.inf)

  def random_params(self, key: jax.Array, depth: int = 4, scale: float = 2.0) -> jax.Array:
    shape = (self.vocab_size, depth, self.vocab_size)
    return scale * jax.random.normal(key, shape, jnp.float32)

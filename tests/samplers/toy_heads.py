"""Medusa heads on any toy causal model, for `samplers.medusa`'s tests.

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


@dataclasses.dataclass(frozen=True)
class WithHeads:
  base: Any
  num_medusa_heads: int

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

  def apply_with_heads(self, params, tokens, positions, cache, attention_mask=None):
    logits, cache = self.apply(params, tokens, positions, cache, attention_mask)
    return logits, params["heads"][tokens], cache

  def random_heads(self, key: jax.Array, scale: float = 2.0) -> jax.Array:
    shape = (self.vocab_size, self.num_medusa_heads, self.vocab_size)
    return scale * jax.random.normal(key, shape, jnp.float32)

"""A tabular causal model whose next token depends on the whole prefix and on the position ids.

`toy.TrigramLM` reads only the last cached token and ignores positions, so a sampler that writes
a wrong position id, keeps a rejected token's slot, or compacts a tree's accepted path into the
wrong slots can still match its joint. `PrefixLM` cannot be fooled that way: after a context of
tokens x_0..x_t at positions 0..t, its next-token logits are `table[h]` with

    h = sum_i mult[pos_i] * (x_i + 1)  (mod H)

over every cached slot below the row's pointer and every new token the attention mask lets the
query see (itself included), where pos_i is the position id the sampler passed. A stray token, a
lost one or a shifted position changes h. `exact_joint` enumerates the joint of any continuation by
brute force from the same formula.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from tests.samplers.toy import enumerate_joint, softmax, write_slots

BUCKETS = 101  # H: a prime, so that mult[pos] * (x + 1) spreads over the table


@flax.struct.dataclass
class PrefixCache:
  """tokens, positions: [B, S] int32 per slot; lengths: [B] int32 valid slots per row."""

  tokens: jax.Array
  positions: jax.Array
  lengths: jax.Array


@dataclasses.dataclass(frozen=True)
class PrefixLM:
  """Parameters: {"table": [H, V] float32 logits, "mult": [max_len] int32 in [1, H)}."""

  vocab_size: int
  max_len: int

  def init(self, key: jax.Array, scale: float = 1.5) -> dict:
    table_key, mult_key = jax.random.split(key)
    return {"table": scale * jax.random.normal(table_key, (BUCKETS, self.vocab_size)),
            "mult": jax.random.randint(mult_key, (self.max_len,), 1, BUCKETS)}

  def init_cache(self, batch: int, max_len: int | None = None) -> PrefixCache:
    shape = (batch, max_len or self.max_len)
    return PrefixCache(tokens=jnp.zeros(shape, jnp.int32), positions=jnp.zeros(shape, jnp.int32),
                       lengths=jnp.zeros((batch,), jnp.int32))

  def apply(self, params, tokens, positions, cache, attention_mask=None):
    """tokens, positions [B, T] int32; attention_mask [B, T, T] bool or None (causal)."""
    steps = tokens.shape[1]
    if attention_mask is None:
      attention_mask = jnp.tril(jnp.ones((1, steps, steps), bool))
    mult = params["mult"]
    term = lambda tok, pos: mult[jnp.clip(pos, 0, self.max_len - 1)] * (tok + 1) % BUCKETS
    valid = jnp.arange(cache.tokens.shape[1])[None, :] < cache.lengths[:, None]
    cached = jnp.sum(jnp.where(valid, term(cache.tokens, cache.positions), 0), axis=1)  # [B]
    new = jnp.sum(jnp.where(attention_mask, term(tokens, positions)[:, None, :], 0), axis=-1)
    logits = params["table"][(cached[:, None] + new) % BUCKETS]  # [B, T, V]
    return logits, cache.replace(tokens=write_slots(cache.tokens, cache.lengths, tokens),
                                 positions=write_slots(cache.positions, cache.lengths, positions),
                                 lengths=cache.lengths + steps)


def exact_joint(params, prompt, steps: int,
                dist: Callable[[np.ndarray], np.ndarray] = softmax,
                eos_id: int | None = None, pad_id: int = 0) -> np.ndarray:
  """Probabilities [V] * steps of every continuation of `prompt` (1-D tokens at positions
  0, 1, ...), by enumeration; `dist`, `eos_id` and `pad_id` as in `toy.exact_joint`."""
  table = np.asarray(params["table"], np.float64)
  mult = np.asarray(params["mult"], np.int64)
  h = sum(int(mult[i]) * (int(x) + 1) for i, x in enumerate(prompt)) % BUCKETS
  advance = lambda state, x: ((state[0] + mult[state[1]] * (x + 1)) % BUCKETS, state[1] + 1)
  return enumerate_joint(lambda state: table[state[0]], advance, (h, len(prompt)), steps, dist,
                         eos_id, pad_id)

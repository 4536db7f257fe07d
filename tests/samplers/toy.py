"""A tabular trigram model meeting `samplers.core.protocol.CausalModel`, with its exact joint.

The next-token logits after a token are `table[previous, current]`, where `previous` is the token
before `current` along its attention path (the prompt's first token has previous = 0). It reads its
cache (the token at slot lengths-1) and honours tree attention masks, so a sampler that mishandles
rollback, per-row pointers or trees gets a different distribution, and the exact joint of any
continuation is enumerable by brute force (`exact_joint`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class TokenCache:
  """tokens: [B, S] int32 tokens per slot; lengths: [B] int32 valid slots per row."""

  tokens: jax.Array
  lengths: jax.Array


@dataclasses.dataclass(frozen=True)
class TrigramLM:
  """Parameters are a [V, V, V] float32 logit table indexed [previous, current, next]."""

  vocab_size: int
  max_len: int

  def init(self, key: jax.Array, scale: float = 1.5) -> jax.Array:
    shape = (self.vocab_size,) * 3
    return scale * jax.random.normal(key, shape, jnp.float32)

  def init_cache(self, batch: int, max_len: int | None = None) -> TokenCache:
    return TokenCache(tokens=jnp.zeros((batch, max_len or self.max_len), jnp.int32),
                      lengths=jnp.zeros((batch,), jnp.int32))

  def apply(self, params, tokens, positions, cache, attention_mask=None):
    """tokens, positions [B, T] int32 (positions unused), attention_mask [B, T, T] bool or None."""
    del positions
    steps = tokens.shape[1]
    if attention_mask is None:
      attention_mask = jnp.tril(jnp.ones((1, steps, steps), bool))
    # The previous token among the new ones is the deepest other token a token sees (its parent
    # in a tree mask, whatever slot order the tree is fed in; token i - 1 under a causal mask).
    index = jnp.arange(steps)
    ancestors = attention_mask & (index[None, None, :] != index[None, :, None])  # [B, T, T]
    seen = jnp.sum(attention_mask, axis=-1)  # [B or 1, T]: how deep each new token is
    depth_of = jnp.where(ancestors, seen[:, None, :], -1)
    parent = jnp.where(jnp.any(ancestors, axis=-1), jnp.argmax(depth_of, axis=-1), -1)
    last_slot = jnp.clip(cache.lengths - 1, 0)[:, None]
    cached = jnp.where(cache.lengths[:, None] > 0,
                       jnp.take_along_axis(cache.tokens, last_slot, axis=1), 0)  # [B, 1]
    new_parent = jnp.take_along_axis(tokens, jnp.clip(parent, 0), axis=1)
    previous = jnp.where(parent >= 0, new_parent, cached)
    written = write_slots(cache.tokens, cache.lengths, tokens)
    return params[previous, tokens], cache.replace(tokens=written, lengths=cache.lengths + steps)


def write_slots(buffer: jax.Array, lengths: jax.Array, values: jax.Array) -> jax.Array:
  """buffer [B, S] with row b's values [B, T] written at slots lengths[b] .. lengths[b] + T - 1
  (past S dropped): how the toy caches append new tokens."""
  slots = lengths[:, None] + jnp.arange(values.shape[1])[None, :]
  rows = jnp.broadcast_to(jnp.arange(values.shape[0])[:, None], slots.shape)
  return buffer.at[rows, slots].set(values, mode="drop")


def softmax(logits: np.ndarray) -> np.ndarray:
  z = np.exp(logits - logits.max())
  return z / z.sum()


def exact_joint(table, prompt, steps: int,
                dist: Callable[[np.ndarray], np.ndarray] = softmax,
                eos_id: int | None = None, pad_id: int = 0) -> np.ndarray:
  """Probabilities [V] * steps of every continuation of `prompt` (1-D tokens), by enumeration.

  `dist` maps next-token logits [V] to the sampling distribution (e.g. with temperature/top-k).
  With `eos_id`, a continuation ends at its first eos and its remaining tokens are `pad_id`.
  """
  table = np.asarray(table, np.float64)
  prompt = list(prompt)
  start = (prompt[-2] if len(prompt) > 1 else 0, prompt[-1])
  return enumerate_joint(lambda state: table[state], lambda state, x: (state[1], x), start, steps,
                         dist, eos_id, pad_id)


def enumerate_joint(logits_of: Callable, advance: Callable, state, steps: int,
                    dist: Callable[[np.ndarray], np.ndarray] = softmax,
                    eos_id: int | None = None, pad_id: int = 0) -> np.ndarray:
  """The joint [V] * steps of a model given as a state machine, by brute-force enumeration.

  `logits_of(state)` gives the next-token logits [V] in `state`, `advance(state, x)` the state
  after token x; `dist` maps logits to the sampling distribution. With `eos_id`, a continuation
  ends at its first eos and its remaining tokens are `pad_id`.
  """
  def padding(vocab, depth):
    tail = np.zeros((vocab,) * depth)
    tail[(pad_id,) * depth] = 1.0
    return tail

  def joint(state, depth):
    p = np.asarray(dist(logits_of(state)), np.float64)
    if depth == 1:
      return p
    return np.stack([p[x] * (padding(len(p), depth - 1) if x == eos_id
                             else joint(advance(state, x), depth - 1)) for x in range(len(p))])

  return joint(state, steps)


def context_free(logits) -> jax.Array:
  """A [V, V, V] table whose next-token logits are `logits` [V] whatever the context."""
  logits = jnp.asarray(logits, jnp.float32)
  return jnp.broadcast_to(logits, (logits.shape[0],) * 3)


# The target/draft pair and oracle sizes shared by the drafted samplers' exactness tests
# (speculative, adaptive, SpecTr, tree): context-dependent trigram tables over 5 tokens.
VOCAB = 5
TOY = TrigramLM(vocab_size=VOCAB, max_len=16)
TARGET = TOY.init(jax.random.key(1))
DRAFT = TARGET + TOY.init(jax.random.key(2), scale=1.0)  # related, so acceptance is mixed
ORACLE_PROMPTS = [[1, 2], [3]]  # ragged: the second row is right-padded, and of length 1
ORACLE_ROWS = 100_000  # per prompt
ORACLE_STEPS = 4  # 5^4 = 625 continuations per prompt

"""A per-row pool of n-grams, keyed by their first token (lookahead decoding's n-gram pool).

Fu et al. 2024 ("Break the Sequential Dependency of LLM Inference Using Lookahead Decoding"):
the lookahead branch's Jacobi trajectories produce n-grams; those whose first token equals the
row's last committed token are drafts for the verification branch. The pool is a fixed-size ring
per row (static shapes): inserting skips n-grams already present, and the oldest entries are
overwritten first. Everything is elementwise over rows, so it traces into a decode loop.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class NgramPool:
  """Attributes:
    grams: [B, P, N] int32 stored n-grams.
    stamp: [B, P] int32 insertion order (larger is newer); -1 marks an empty entry.
    clock: [B] int32 the next stamp; also where the ring writes next (modulo P).
  """

  grams: jax.Array
  stamp: jax.Array
  clock: jax.Array


def empty(batch: int, size: int, n: int) -> NgramPool:
  """A pool of `size` empty entries of n-grams per row."""
  return NgramPool(grams=jnp.zeros((batch, size, n), jnp.int32),
                   stamp=jnp.full((batch, size), -1, jnp.int32),
                   clock=jnp.zeros((batch,), jnp.int32))


def insert(pool: NgramPool, grams: jax.Array, valid: jax.Array | None = None) -> NgramPool:
  """Adds each row's new n-grams [B, K, N] that the row's pool (and an earlier new one) lacks.

  The k-th inserted n-gram of a row goes to ring slot (clock + k) mod P, overwriting the oldest
  entry once the ring is full. K may exceed P; then only the last P inserted survive. `valid`
  [B, K] bool (default all) leaves out the n-grams marked False.
  """
  size = pool.stamp.shape[1]
  count = grams.shape[1]
  same = jnp.all(grams[:, :, None, :] == pool.grams[:, None, :, :], axis=-1)  # [B, K, P]
  in_pool = jnp.any(same & (pool.stamp[:, None, :] >= 0), axis=-1)
  pairs = jnp.all(grams[:, :, None, :] == grams[:, None, :, :], axis=-1)  # [B, K, K]
  if valid is not None:
    pairs &= valid[:, None, :]  # only an earlier valid n-gram makes a repeat
  earlier = jnp.tril(jnp.ones((count, count), bool), -1)
  repeated = jnp.any(pairs & earlier[None], axis=-1)
  fresh = ~in_pool & ~repeated & (True if valid is None else valid)  # [B, K]
  order = jnp.cumsum(fresh, axis=1, dtype=jnp.int32) - 1  # k-th fresh n-gram of its row
  stamp = pool.clock[:, None] + order
  # a fresh n-gram that a later fresh one of the same call overwrites (K > P) is dropped
  keep = fresh & (order >= jnp.sum(fresh, axis=1, keepdims=True) - size)
  slot = jnp.where(keep, stamp % size, size)  # size: out of range, dropped
  rows = jnp.broadcast_to(jnp.arange(grams.shape[0])[:, None], slot.shape)
  return NgramPool(grams=pool.grams.at[rows, slot].set(grams, mode="drop"),
                   stamp=pool.stamp.at[rows, slot].set(stamp, mode="drop"),
                   clock=pool.clock + jnp.sum(fresh, axis=1, dtype=jnp.int32))


def select(pool: NgramPool, first: jax.Array, count: int) -> tuple[jax.Array, jax.Array]:
  """The `count` newest n-grams of each row that start with first [B].

  Returns:
    (continuations [B, count, N - 1] int32: the n-grams without their first token, newest
    first; found [B, count] bool: which of them exist).
  """
  match = (pool.grams[:, :, 0] == first[:, None]) & (pool.stamp >= 0)
  score, index = jax.lax.top_k(jnp.where(match, pool.stamp, -1), count)
  grams = jnp.take_along_axis(pool.grams, index[:, :, None], axis=1)
  return grams[:, :, 1:], score >= 0


def ending_at(tokens: jax.Array, ends: jax.Array, n: int,
              length: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The n-grams of each row's text that end at the given positions.

  Args:
    tokens: [B, S] int32 each row's text; ends: [B, K] int32 positions of the n-grams' last
      tokens; n: static; length: [B] int32 valid tokens per row.
  Returns:
    (grams [B, K, N] int32, valid [B, K] bool: the n-gram lies inside [0, length)).
  """
  starts = ends - (n - 1)
  index = starts[:, :, None] + jnp.arange(n)[None, None, :]
  grams = jax.vmap(lambda row, i: row[i])(tokens, jnp.clip(index, 0, tokens.shape[1] - 1))
  return grams, (starts >= 0) & (ends < length[:, None])

"""Token packing for ragged verify calls: each row's first `counts[b]` tokens of a dense
[B, W] layout laid end to end in one sequence of a static size, and the call's outputs laid back.

A batch whose rows verify different numbers of drafts pays, in a dense call, for B x W tokens;
packed, the projections and the MLP run on the tokens the rows hold
(`CausalModel.apply_packed`, `attention.attend_packed`). Which tokens a row keeps must depend on
the drafts alone (never on the target) for the verification to stay exact; the packing itself
changes no logit.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Packing:
  """Where each packed token comes from. Attributes:
    rows: [size] int32 its row; B for padding after the last row's tokens.
    offsets: [size] int32 its place in its row, in [0, W).
    starts: [B] int32 each row's first packed index.
    counts: [B] int32 tokens per row.
  """
  rows: jax.Array
  offsets: jax.Array
  starts: jax.Array
  counts: jax.Array

  def gather(self, dense: jax.Array) -> jax.Array:
    """[B, W, ...] -> [size, ...]: each packed token's entry (padding: row B - 1's, unused)."""
    return dense[jnp.minimum(self.rows, dense.shape[0] - 1), self.offsets]

  def scatter(self, packed: jax.Array, width: int) -> jax.Array:
    """[size, ...] -> [B, W, ...]: row b's first counts[b] entries from the packed call, zeros
    after them."""
    place = jnp.clip(self.starts[:, None] + jnp.arange(width), 0, packed.shape[0] - 1)
    kept = jnp.arange(width) < self.counts[:, None]
    return jnp.where(kept.reshape(*kept.shape, *[1] * (packed.ndim - 1)), packed[place], 0)


def pack(counts: jax.Array, size: int, width: int) -> Packing:
  """The packing of row b's first counts[b] tokens (sum(counts) <= size, each <= width)."""
  ends = jnp.cumsum(counts)
  starts = ends - counts
  index = jnp.arange(size)
  rows = jnp.sum(index[:, None] >= ends[None, :], axis=1, dtype=jnp.int32)
  offsets = jnp.clip(index - starts[jnp.minimum(rows, counts.shape[0] - 1)], 0, width - 1)
  return Packing(rows, offsets.astype(jnp.int32), starts, counts)


"""The zig-zag sequence layout that balances causal ring attention across devices.

Split a sequence into 2n chunks. In the natural layout device i holds chunks (2i, 2i+1); in the
zig-zag layout it holds chunks (i, 2n-1-i), an early and a late one, so that under a causal mask
every device has the same amount of visible keys on every ring step. Both functions run inside
`shard_map` on the local shard and move one chunk per `ppermute` (no global gather): each device
sends its two chunks to their new owners and receives exactly one even and one odd chunk.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def _owner(chunk: int, size: int) -> int:
  """The device that holds `chunk` (of 2 * size) in the zig-zag layout."""
  return chunk if chunk < size else 2 * size - 1 - chunk


def _moves(size: int, parity: int) -> list[tuple[int, int]]:
  """(natural owner, zig-zag owner) of chunk 2i + parity for every device i."""
  return [(i, _owner(2 * i + parity, size)) for i in range(size)]


def to_zigzag(x: jax.Array, axis: str, size: int) -> jax.Array:
  """Natural -> zig-zag: device i's [B, 2c, ...] of chunks (2i, 2i+1) -> chunks (i, 2n-1-i)."""
  first, second = jnp.split(x, 2, axis=1)
  even = lax.ppermute(first, axis, _moves(size, 0))
  odd = lax.ppermute(second, axis, _moves(size, 1))
  # Device i's early chunk is i itself: even when i is even.
  i_even = lax.axis_index(axis) % 2 == 0
  return jnp.concatenate([jnp.where(i_even, even, odd), jnp.where(i_even, odd, even)], axis=1)


def from_zigzag(x: jax.Array, axis: str, size: int) -> jax.Array:
  """Zig-zag -> natural, the inverse of `to_zigzag`."""
  early, late = jnp.split(x, 2, axis=1)
  i_even = lax.axis_index(axis) % 2 == 0
  back = lambda moves: [(dst, src) for src, dst in moves]
  first = lax.ppermute(jnp.where(i_even, early, late), axis, back(_moves(size, 0)))
  second = lax.ppermute(jnp.where(i_even, late, early), axis, back(_moves(size, 1)))
  return jnp.concatenate([first, second], axis=1)


"""Continuous batching for canvas samplers: S slots decode N canvases, and a slot whose canvas is
complete takes the next waiting one at once.

A sampler that commits a varying number of tokens per step (a threshold rule) finishes rows
after different numbers of model calls. Decoding all N rows as one batch makes every call
process all N until the slowest row is done, so the batch's tokens per call is set by its worst
row. Here each call processes S rows (S <= N); after it, every finished row is written out and
its slot refilled from the queue, in row order. The calls spent per row are then the row's own
(what decoding it alone costs), and only the last rows' tail leaves slots idle.

Exactness: a row's step s uses the uniforms of fold_in(row_key, s), s counted from the row's own
first step, whichever slot and pass it runs in; so every row gets the tokens it gets at any other
S, alone or in one batch (up to the denoiser's floating-point dependence on batch composition).
With S = N no refill happens and this is plain batched decoding.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from samplers.core import canvas as canvas_lib

# step(tokens [S, L], eligible [S, L] bool, uniforms [S, *shape]) -> tokens [S, L]: one model
# call on the slots' canvases, committing some eligible (masked, in a live slot) positions
Step = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def decode(canvas: jax.Array, keys: jax.Array, slots: int, mask_id: int, step: Step,
           uniform_shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Runs `step` until every mask of `canvas` is filled, S = min(slots, N) rows per call.

  Args:
    canvas: [N, L] int32 canvases; keys: [N] typed row keys (`rng.row_keys`).
    slots: S, rows per model call (static).
    step: one call and commit (see `Step`); it must commit >= 1 eligible token per live row
      with masks, or the loop does not end.
    uniform_shape: the per-row shape of each step's uniforms (`canvas.step_uniforms`).
  Returns:
    (tokens [N, L] the completed canvases, passes [] int32 model calls of the S-row batch,
    row_calls [] int32 calls summed over rows, each row counted while it had masks).
  A row with no mask needs no call, but takes a slot for one pass when it is refilled mid-run.
  """
  rows, _ = canvas.shape
  slots = min(slots, rows)

  def settle(out, slot_row, tokens, row_step, next_row):
    """Writes out finished rows and gives every free slot the next waiting row (N: none)."""
    live = slot_row < rows
    free = ~live | ~jnp.any(tokens == mask_id, axis=1)
    out = out.at[jnp.where(live & free, slot_row, rows)].set(tokens, mode="drop")
    incoming = next_row + jnp.cumsum(free) - 1
    slot_row = jnp.where(free, jnp.minimum(incoming, rows), slot_row)
    tokens = jnp.where(free[:, None], canvas[jnp.minimum(incoming, rows - 1)], tokens)
    row_step = jnp.where(free, 0, row_step)
    return out, slot_row, tokens, row_step, next_row + jnp.sum(free, dtype=jnp.int32)

  def body(state):
    out, slot_row, tokens, row_step, next_row, passes, row_calls = state
    eligible = (tokens == mask_id) & (slot_row < rows)[:, None]
    u = canvas_lib.step_uniforms(keys[jnp.minimum(slot_row, rows - 1)], row_step, uniform_shape)
    tokens = step(tokens, eligible, u)
    row_calls += jnp.sum(jnp.any(eligible, axis=1), dtype=jnp.int32)
    return (*settle(out, slot_row, tokens, row_step + 1, next_row), passes + 1, row_calls)

  empty = jnp.full((slots,), rows, jnp.int32)
  start = settle(canvas, empty, jnp.zeros((slots,) + canvas.shape[1:], canvas.dtype),
                 jnp.zeros((slots,), jnp.int32), jnp.int32(0))
  # a live row without masks needs no call: `out` starts as the canvas, which is its result
  running = lambda s: jnp.any((s[1] < rows) & jnp.any(s[2] == mask_id, axis=1)) | (s[4] < rows)
  out, *_, passes, row_calls = jax.lax.while_loop(
      running, body, (*start, jnp.int32(0), jnp.int32(0)))
  return out, passes, row_calls

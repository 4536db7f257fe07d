"""Per-row bookkeeping of the tokens a decode loop generates: what a step emits, when a row stops,
how its length counts, and the pad after its end.

A row is done once it has emitted eos (counted in its length) or max_new_tokens tokens. A finished
row still runs through the loop (static shapes) but emits nothing: pad_id in the one-token loops
(`token`), no committed token in the block loops (`block`). Everything is elementwise over [B] or
[B, W] arrays, so it traces into the jitted loops without host syncs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token(drawn: jax.Array, done: jax.Array, lengths: jax.Array, eos_id: int | None,
          pad_id: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One drawn token per row: pad in finished rows, stop rows that emit eos, count the rest.

  Args:
    drawn: [B] int32 the tokens drawn this step.
    done: [B] bool rows finished before this step.
    lengths: [B] int32 tokens each row has generated so far.
    eos_id: a row stops after emitting it; None never stops early.
    pad_id: what a finished row emits.
  Returns:
    (tokens [B] int32: drawn, pad_id where done; done [B]: also the rows that emitted eos now;
    lengths [B]: + 1 for the rows that were not done). The max_new_tokens stop is the caller's.
  """
  emitted = jnp.where(done, pad_id, drawn)
  lengths = lengths + (~done).astype(jnp.int32)
  if eos_id is not None:
    done = done | (emitted == eos_id)
  return emitted, done, lengths


def block(new: jax.Array, offered: jax.Array, lengths: jax.Array, done: jax.Array,
          max_new_tokens: int, eos_id: int | None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Commits new[b, :offered[b]] to each unfinished row, cut after eos and at max_new_tokens.

  Args:
    new: [B, W] int32 candidate tokens, in order, after each row's `lengths` tokens.
    offered: [B] int32 how many of them the row may commit (the rest are discarded).
    lengths: [B] int32 tokens each row has generated so far.
    done: [B] bool finished rows (they commit nothing).
    max_new_tokens: N, the most tokens a row generates.
    eos_id: nothing after the first eos is committed and the row stops; None never stops early.
  Returns:
    (take [B, W] bool: the committed tokens, a prefix of each row; lengths [B] + committed;
    done [B]: also rows that committed eos or reached N).
  """
  index = jnp.arange(new.shape[1])[None, :]
  take = (index < offered[:, None]) & (index < (max_new_tokens - lengths)[:, None]) & ~done[:, None]
  hit_eos = jnp.zeros_like(done)
  if eos_id is not None:
    is_eos = take & (new == eos_id)
    take &= (jnp.cumsum(is_eos, axis=1) - is_eos) == 0  # nothing after the first eos
    hit_eos = jnp.any(is_eos, axis=1)
  lengths = lengths + jnp.sum(take, axis=1, dtype=jnp.int32)
  return take, lengths, done | hit_eos | (lengths >= max_new_tokens)


def pad_after(tokens: jax.Array, lengths: jax.Array, pad_id: int) -> jax.Array:
  """tokens [B, N] with pad_id from column lengths[b] on in row b."""
  index = jnp.arange(tokens.shape[1])[None, :]
  return jnp.where(index < lengths[:, None], tokens, pad_id)


def generated(seq: jax.Array, prompt_lengths: jax.Array, lengths: jax.Array, max_new_tokens: int,
              pad_id: int) -> jax.Array:
  """The generated tokens [B, N] of sequences seq [B, S] (prompt, then generation), padded.

  Row b is seq[b, prompt_lengths[b] : prompt_lengths[b] + lengths[b]], then pad_id up to N.
  """
  index = jnp.arange(max_new_tokens)[None, :]
  tokens = jnp.take_along_axis(seq, prompt_lengths[:, None] + index, axis=1)
  return pad_after(tokens, lengths, pad_id)

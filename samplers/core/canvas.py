"""The canvas shared by the diffusion-style samplers: a [B, L] token array whose mask ids are the
positions to generate, plus the per-row, per-step randomness and token draws they all use.

A diffusion sampler fills every mask of its canvas (infilling in general; continuation when the
masks follow a prompt, see `from_prompts`) and returns the completed canvas. A row's randomness
at step s is `fold_in(row_key, s)`, one draw of [L, ...] uniforms, so a row's result depends only
on its own key, never on the batch it runs in; `position_uniforms` draws each position with its own
key as well, so that a position's draws do not depend on the canvas length either (a row padded to
a batch's longer canvas draws what it draws alone).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from samplers.core import verify
from samplers.core.logits import SamplingParams
from samplers.core.protocol import SampleOutput


def from_prompts(prompt: jax.Array, prompt_lengths: jax.Array, num_new: int, mask_id: int,
                 pad_id: int) -> jax.Array:
  """A canvas [B, P + N] int32: row b is prompt[b, :len_b], then N masks, then pad_id.

  Args:
    prompt: [B, P] int32 right-padded prompts; prompt_lengths: [B] int32 in [0, P].
    num_new: N, tokens to generate after each prompt.
  """
  batch, prompt_len = prompt.shape
  index = jnp.arange(prompt_len + num_new)[None, :]
  lengths = prompt_lengths.astype(jnp.int32)[:, None]
  padded = jnp.concatenate([prompt, jnp.full((batch, num_new), pad_id, prompt.dtype)], axis=1)
  masked = (index >= lengths) & (index < lengths + num_new)
  return jnp.where(index < lengths, padded, jnp.where(masked, mask_id, pad_id)).astype(jnp.int32)


def generated(tokens: jax.Array, prompt_lengths: jax.Array, num_new: int) -> jax.Array:
  """The N tokens after each row's prompt: tokens [B, L] -> [B, N] (inverse of `from_prompts`)."""
  columns = prompt_lengths.astype(jnp.int32)[:, None] + jnp.arange(num_new)[None, :]
  return jnp.take_along_axis(tokens, columns, axis=1)


def step_uniforms(keys: jax.Array, step: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """[B, *shape] float32 uniforms in (0, 1) of step `step` ([] or [B] int32) for rows with typed
  keys [B]: drawn with fold_in(row_key, step)."""
  step = jnp.broadcast_to(step, keys.shape)
  return jax.vmap(lambda k, s: verify.uniforms(jax.random.fold_in(k, s), shape))(keys, step)


def position_uniforms(keys: jax.Array, step: jax.Array, length: int,
                      shape: tuple[int, ...]) -> jax.Array:
  """[B, length, *shape] float32 uniforms in (0, 1) of step `step` ([] or [B] int32) for rows with
  typed keys [B]: position i draws with fold_in(fold_in(row_key, step), i)."""
  def row(key, s):
    key = jax.random.fold_in(key, s)
    return jax.vmap(lambda i: verify.uniforms(jax.random.fold_in(key, i), shape))(
        jnp.arange(length))
  return jax.vmap(row)(keys, jnp.broadcast_to(step, keys.shape))


def draw_tokens(u: jax.Array, dist: jax.Array, sampling: SamplingParams) -> jax.Array:
  """One token per position, [B, L] int32, from dist [B, L, V] with uniforms u [B, L, V]
  (Gumbel-max; argmax when greedy)."""
  if sampling.greedy:
    return jnp.argmax(dist, axis=-1).astype(jnp.int32)
  return jax.vmap(jax.vmap(verify.draw))(u, dist)


def check_model(model, canvas: jax.Array) -> None:
  """ValueError when the canvas does not fit the model."""
  if canvas.ndim != 2:
    raise ValueError(f"canvas must be [batch, length] int32, got shape {canvas.shape}")
  if canvas.shape[1] > model.max_len:
    raise ValueError(f"canvas length {canvas.shape[1]} exceeds the model's max_len "
                     f"{model.max_len}; shorten the prompt or generate fewer tokens")


def output(canvas: jax.Array, tokens: jax.Array, mask_id: int, calls: jax.Array,
           rows_per_call: int | None = None, **extra: jax.Array) -> SampleOutput:
  """The SampleOutput of a diffusion sampler: the completed canvas and its statistics.

  `calls` model calls of `rows_per_call` rows each (default: the whole batch, B)."""
  lengths = jnp.sum(canvas == mask_id, axis=1).astype(jnp.int32)
  generated = jnp.sum(lengths)
  rows = canvas.shape[0] if rows_per_call is None else rows_per_call
  stats = {"model_calls": calls, "rows_per_call": jnp.int32(rows), "generated_tokens": generated,
           "tokens_per_call": generated / jnp.maximum(rows * calls, 1).astype(jnp.float32),
           **extra}
  return SampleOutput(tokens=tokens, lengths=lengths, stats=stats)

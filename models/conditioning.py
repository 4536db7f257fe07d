"""Conditional (prompt -> response) training of the diffusion-style models.

A corpus of lines `prompt<SEP>response` (e.g. the task suite's `add 12+34=046`) can be learned as
a conditional model, as LLaDA's supervised fine-tuning does: the prompt is never noised and only
the response is generated, so every gradient is about answering and none about the unpredictable
prompt. With `model.diffusion.response_after` set to the separator character, a position is a
*response* position when that character occurs earlier on its line (lines end at a newline, which
is never a response position); the MDLM masks only response positions (its ELBO then bounds
-log p(response | prompt)), the AS-ARM keeps every prompt position visible and orders only the
responses, and the Learn2PD trajectories start from clean prompts and masked responses.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEWLINE_ID = ord("\n")  # the byte tokenizer's ids are the bytes


def response_positions(tokens: jax.Array, separator: str) -> jax.Array:
  """tokens [B, T] int32 -> [B, T] bool: after a `separator` byte on the same line (a line ends at
  a newline; the newline itself is not a response position). A window that starts inside a
  response without its separator treats that part as prompt."""
  index = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  last_newline = jax.lax.cummax(jnp.where(tokens == NEWLINE_ID, index, -1), axis=1)
  last_separator = jax.lax.cummax(jnp.where(tokens == ord(separator), index, -1), axis=1)
  separator_before = jnp.pad(last_separator, ((0, 0), (1, 0)), constant_values=-1)[:, :-1]
  return (separator_before > last_newline) & (tokens != NEWLINE_ID)


def noisable(tokens: jax.Array, separator: str) -> jax.Array:
  """[B, T] bool: the positions a model may noise/generate: all (unconditional, separator "") or
  the response positions."""
  if not separator:
    return jnp.ones(tokens.shape, bool)
  return response_positions(tokens, separator)

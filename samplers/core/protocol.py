"""The small model protocol every sampler is written against, and the common sampler output.

Samplers never import `models`: anything meeting `CausalModel` works, from the Llama decoder
(`models.causal_lm.CausalLM`) to tabular toy models whose exact joint is enumerable in tests.
"""

from __future__ import annotations

from typing import Any, Protocol

import flax.struct
import jax
import jax.numpy as jnp


class Cache(Protocol):
  """Any pytree with a per-row write pointer; rollback is `cache.replace(lengths=...)`.

  Attributes:
    lengths: [B] int32 number of valid slots per row.
  """

  lengths: jax.Array

  def replace(self, **changes: Any) -> Cache: ...


class CausalModel(Protocol):
  """A causal model with a per-row cache. Implementations must be hashable (jit static args).

  Attributes:
    vocab_size: V, the number of token ids.
    max_len: the longest sequence (prompt + generation) the model accepts.

  A model may also define `prefill(params, tokens, positions, cache) -> (logits, cache)`: the
  result of `apply` with a causal mask on an empty cache, computed however suits the model (the
  Llama decoder runs it sequence-parallel). Samplers use it, when present, for the first call.
  A draft may define `apply_with_acceptance` (an acceptance head, see `samplers.adaptive`).
  A target may define `apply_packed(params, tokens [1, T], positions [1, T], rows [T],
  offsets [T], width, cache) -> (logits [1, T, V], cache)`: a cached call on several rows' new
  tokens laid end to end (`samplers.core.packing`; the Llama decoder's
  `Transformer.decode_packed`), which packed verifies need (`continuous_spec`, TETRIS), and
  `apply_step_with_chunks(params, step_tokens [B], step_positions [B], step_writes [B],
  chunk_tokens [K, C], chunk_positions [K, C], chunk_rows [K], chunk_last [K], cache) ->
  (logits [B, V], chunk logits [K, V], cache)`: a decode step with prompt chunks piggybacked
  (`samplers.chunked_prefill`).
  """

  vocab_size: int
  max_len: int

  def init_cache(self, batch: int, max_len: int | None = None) -> Cache:
    """An empty cache of `max_len` slots per row (default: the model's max_len)."""

  def apply(self, params: Any, tokens: jax.Array, positions: jax.Array, cache: Cache,
            attention_mask: jax.Array | None = None) -> tuple[jax.Array, Cache]:
    """Scores T new tokens per row and appends them to the cache.

    Args:
      params: the model's parameters.
      tokens: [B, T] int32 new tokens.
      positions: [B, T] int32 their position ids (independent of cache slots).
      cache: the cache; new token i of row b goes to slot cache.lengths[b] + i.
      attention_mask: [B, T, T] bool, new token i may see new token j; None means causal. Every
        new token sees all cache slots below cache.lengths.
    Returns:
      ([B, T, V] float32 logits of the next token after each new token, cache with lengths + T).
    """


def prefill_method(model: CausalModel):
  """The model's optional `prefill` (e.g. sequence-parallel) when it has one, else `apply`."""
  return getattr(model, "prefill", model.apply)


def prompt_positions(prompt: jax.Array) -> jax.Array:
  """[B, P] int32 positions 0..P-1 of right-padded prompts."""
  return jnp.broadcast_to(jnp.arange(prompt.shape[1], dtype=jnp.int32), prompt.shape)


def prefill(model: CausalModel, params: Any, prompt: jax.Array,
            cache: Any) -> tuple[jax.Array, Any]:
  """Scores right-padded prompts [B, P] from position 0 into an empty cache.

  Returns ([B, P, V] logits, the cache; its pointer is for the caller to set).
  """
  return prefill_method(model)(params, prompt, prompt_positions(prompt), cache)


def last_prompt_logits(logits: jax.Array, prompt_lengths: jax.Array) -> jax.Array:
  """The logits after each row's last prompt token: what the first generated token is drawn from.

  Args:
    logits: [B, P, V] logits of right-padded prompts (e.g. from `prefill`).
    prompt_lengths: [B] int32, each in [1, P].
  Returns:
    [B, V] logits[b, prompt_lengths[b] - 1].
  """
  return jnp.take_along_axis(logits, (prompt_lengths - 1)[:, None, None], axis=1)[:, 0]


def check_max_new_tokens(max_new_tokens: int) -> None:
  """ValueError unless a sampler config asks for at least one new token."""
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")


def check_num_draft_tokens(num_draft_tokens: int) -> None:
  """ValueError unless a drafted sampler's config drafts at least one token per round."""
  if num_draft_tokens < 1:
    raise ValueError(f"num_draft_tokens (gamma) must be >= 1, got {num_draft_tokens}")


def check_probabilities(config: Any, *names: str) -> None:
  """ValueError unless each of the config's fields `names` (thresholds) is in [0, 1]."""
  for name in names:
    if not 0.0 <= getattr(config, name) <= 1.0:
      raise ValueError(f"{name} must be in [0, 1], got {getattr(config, name)}")


def check_vocabularies(first: Any, second: Any, names: tuple[str, str]) -> None:
  """ValueError unless two models (anything with `vocab_size`) share one vocabulary size.

  Args:
    first, second: the models, e.g. a target and its draft.
    names: their roles in the message, e.g. ("target", "draft").
  """
  if first.vocab_size != second.vocab_size:
    raise ValueError(f"the {names[1]}'s vocab_size {second.vocab_size} differs from the "
                     f"{names[0]}'s vocab_size {first.vocab_size}; the {names[1]} and the "
                     f"{names[0]} must share one vocabulary (same tokenizer)")


@flax.struct.dataclass
class SampleOutput:
  """What every sampler returns.

  Attributes:
    tokens: [B, N] int32 generated tokens only (no prompt); pad_id after each row's end.
    lengths: [B] int32 generated tokens per row, counting an emitted eos.
    stats: scalar diagnostics; always `model_calls` (apply calls, prefill included) and
      `generated_tokens` (sum of lengths).
  """

  tokens: jax.Array
  lengths: jax.Array
  stats: dict[str, jax.Array]

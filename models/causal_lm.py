"""`CausalLM`: the Llama decoder behind the small model protocol that samplers use.

A frozen, hashable dataclass, so it can be a static argument of `jax.jit`; all state (params,
cache) is passed explicitly.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from models.base import TransformerModel
from models.kv_cache import KVCache
from models.parscale import StreamCache
from models.losses import distillation_kl, next_token_nll
from models.llama import Transformer


@dataclasses.dataclass(frozen=True)
class CausalLM(TransformerModel):
  """A causal language model meeting `samplers.core.protocol.CausalModel`."""

  def init_cache(self, batch: int, max_len: int | None = None) -> KVCache | StreamCache:
    """An empty cache of `max_len` slots per row (default: config.max_len), compute dtype; with
    ParScale streams (P > 1) one cache per stream under one pointer per row."""
    cfg = self.config
    shape = (cfg.num_layers, batch, max_len or cfg.max_len, cfg.num_kv_heads,
             cfg.resolved_head_dim, jnp.dtype(cfg.dtype))
    if cfg.parscale.streams > 1:
      return StreamCache.zeros(*shape[:2], cfg.parscale.streams, *shape[2:])
    return KVCache.zeros(*shape)

  def apply(self, params, tokens: jax.Array, positions: jax.Array, cache: KVCache,
            attention_mask: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
    """Cached call: tokens/positions [B, T] int32, attention_mask [B, T, T] bool or None (causal).

    Returns ([B, T, V] float32 logits, cache advanced by T); see `Transformer.decode`.
    """
    return self.module.apply({"params": params}, tokens, positions, cache, attention_mask,
                             method=Transformer.decode)

  def apply_packed(self, params, tokens: jax.Array, positions: jax.Array, rows: jax.Array,
                   offsets: jax.Array, width: int, cache: KVCache) -> tuple[jax.Array, KVCache]:
    """Cached call on token-packed rows: tokens/positions [1, T], rows/offsets [T] int32
    (rows >= B: padding), width the most new tokens of a row. Returns ([1, T, V] float32
    logits, cache with the tokens written, lengths unchanged); see `Transformer.decode_packed`."""
    return self.module.apply({"params": params}, tokens, positions, rows, offsets, width, cache,
                             method=Transformer.decode_packed)

  def apply_step_with_chunks(self, params, step_tokens: jax.Array, step_positions: jax.Array,
                             step_writes: jax.Array, chunk_tokens: jax.Array,
                             chunk_positions: jax.Array, chunk_rows: jax.Array,
                             chunk_last: jax.Array, cache: KVCache
                             ) -> tuple[jax.Array, jax.Array, KVCache]:
    """A decode step ([B] tokens) with K prompt chunks ([K, C] tokens of rows chunk_rows)
    piggybacked in one call: ([B, V] logits, [K, V] logits at chunk_last, cache written, lengths
    unchanged); see `Transformer.decode_step_with_chunks`."""
    return self.module.apply({"params": params}, step_tokens, step_positions, step_writes,
                             chunk_tokens, chunk_positions, chunk_rows, chunk_last, cache,
                             method=Transformer.decode_step_with_chunks)

  def prefill(self, params, tokens: jax.Array, positions: jax.Array,
              cache: KVCache) -> tuple[jax.Array, KVCache]:
    """First call on an empty cache: `apply` with a causal mask, but with `config.attention`
    (sequence-parallel on a mesh); see `Transformer.prefill`."""
    return self.module.apply({"params": params}, tokens, positions, cache,
                             method=Transformer.prefill)

  def logits(self, params, tokens: jax.Array) -> jax.Array:
    """Full causal forward at positions 0..T-1: tokens [B, T] int32 -> [B, T, V] float32."""
    return self.module.apply({"params": params}, tokens)

  # ------------------------------------------------------------------ training interface

  def loss(self, params, batch: jax.Array, key: jax.Array, teacher_logits: jax.Array | None = None,
           distill_weight: float = 1.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Next-token cross-entropy on batch [B, L + 1]; with `teacher_logits` [B, L, V]
    (distillation, e.g. a draft for speculative decoding) (1 - w) * cross-entropy + w *
    KL(teacher || student), with `nll` and `kl` as extra metrics. `key` is unused."""
    del key
    logits = self.logits(params, batch[:, :-1])
    nll = next_token_nll(logits, batch[:, 1:]).mean()
    if teacher_logits is None:
      return nll, {}
    kl = distillation_kl(logits, teacher_logits).mean()
    return (1.0 - distill_weight) * nll + distill_weight * kl, {"nll": nll, "kl": kl}

  def eval_nll(self, params, batch: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(summed next-token nll, token count) over batch [B, L + 1], float32 scalars."""
    del key
    nll = next_token_nll(self.logits(params, batch[:, :-1]), batch[:, 1:])
    return nll.sum(), jnp.asarray(nll.size, jnp.float32)

  @staticmethod
  def teacher_inputs(batch: jax.Array) -> jax.Array:
    """The tokens a distillation teacher scores: all but the last of each row."""
    return batch[:, :-1]

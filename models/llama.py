"""Llama-style causal decoder in Flax linen: pre-norm blocks, RoPE, grouped-query attention, SwiGLU.

Three entry points share the same parameters:

* `Transformer.__call__(tokens, positions=None, mask=None)`: the training/eval forward, causal over
  the whole sequence with the attention implementation of `ModelConfig.attention` (dense or
  sequence-parallel), or dense under an explicit mask (bidirectional, block-causal, two-stream).
* `Transformer.prefill(tokens, positions, cache)`: the same cache-free forward for a prompt, which
  also fills an empty cache; samplers use it for their first call.
* `Transformer.decode(tokens, positions, cache, attention_mask)`: the cached call used by samplers
  (see `models/kv_cache.py` for the slot semantics); always dense attention.

Parameters are float32 and carry logical axis names (`nn.with_logical_partitioning`); activations
are annotated with `nn.with_logical_constraint`. Both only take effect inside a mesh plus
axis-rules context (`parallelism.rules.axis_rules()`); otherwise the model runs on one device.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models import attention, dense_attention, fused, parscale
from models.config import ModelConfig
from models.kv_cache import KVCache, write_slots


def _normal(std: float, names: tuple[str, ...]):
  return nn.with_logical_partitioning(nn.initializers.normal(std), names)


class Dense(nn.Module):
  """Bias-free projection contracting the last `contract` axes of x with a [*in, *features] kernel.

  Written out (not nn.DenseGeneral) so that the kernel is initialised in its final shape: flax's
  DenseGeneral initialises a flattened kernel, which breaks logical sharding constraints of
  multi-axis kernels under `jax.set_mesh`.

  The product is one 2-D matmul, [rows, in] @ [in, out] with every leading axis of x folded into
  rows: as a `tensordot` over [B, T, E], XLA:CPU laid the backward's activation gradients out
  transposed for the kernel-gradient dot, a copy that took 15% of a train step (measured in
  docs/training.md); folded, it needs none.
  """

  features: tuple[int, ...]
  names: tuple[str, ...]
  std: float
  dtype: jnp.dtype
  contract: int = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [..., *in] -> [..., *features] in `dtype`."""
    shape = x.shape[x.ndim - self.contract:] + self.features
    kernel = self.param("kernel", _normal(self.std, self.names), shape, jnp.float32)
    lead = x.shape[:x.ndim - self.contract]
    flat = x.astype(self.dtype).reshape(-1, math.prod(shape[:self.contract]))
    out = flat @ kernel.astype(self.dtype).reshape(flat.shape[1], -1)
    return out.reshape(*lead, *self.features)


def _dense(cfg: ModelConfig, features, names, contract=1, std=None, name=None) -> Dense:
  features = tuple(features) if isinstance(features, (tuple, list)) else (features,)
  return Dense(features, names, cfg.init_std if std is None else std, jnp.dtype(cfg.dtype),
               contract, name=name)


def _residual_std(cfg: ModelConfig) -> float:
  """Output projections into the residual stream are scaled down by 1/sqrt(2 * num_layers)."""
  return cfg.init_std / math.sqrt(2 * cfg.num_layers)


class RMSNorm(nn.Module):
  """x / rms(x) * scale, computed in float32 and returned in `dtype` (`fused.rms_norm`)."""

  eps: float
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (x.shape[-1],), jnp.float32)
    return fused.rms_norm(x, scale, self.eps).astype(self.dtype)


class Attention(nn.Module):
  """Grouped-query self-attention with rotary positions, optionally reading a per-layer cache."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x, positions, mask=None, cache=None, rows=None, packed=None):
    """Args:
      x: [B, T, E] normalised activations.
      positions: [B, T] int32 position ids.
      mask: [B or 1, T, T] bool over the new tokens, or None for causal attention with the
        implementation of `config.attention` (then cache must be None).
      cache: None, or the layer's (keys [B, KVH, S, D], values [B, KVH, S, D], lengths [B]):
        the new keys/values are written at slots lengths + i, then attended to with the cache.
      rows: None, or [B, R] int32 indices of the new tokens whose outputs are wanted (with a
        cache and a mask): every token's keys and values are still written, but only those R
        tokens are queried, so the output is [B, R, E] (the last of several appended tokens,
        at a fraction of the work).
      packed: None, or a token-packed layout (B = 1, with a cache, no mask):
        `fn(q, k, v, cache_k, cache_v, lengths) -> (out, kv)`, `attention.attend_packed` or
        `attention.attend_step_with_chunks` with its layout's arguments bound.
    Returns:
      ([B, T or R, E] output, kv): without a cache kv is the new tokens' rotated keys and values
      [B, T, KVH, D]; with one, the layer's updated (keys, values) buffers.
    """
    cfg = self.config
    heads, kv_heads, head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
    queried, query_positions = x, positions
    if rows is not None:
      if cache is None or mask is None or cfg.parscale.prefix_len:
        raise ValueError("Attention rows= queries a subset of the new tokens against a cache: "
                         "pass a cache and a mask (and no ParScale prefix)")
      queried = jnp.take_along_axis(x, rows[..., None], axis=1)
      query_positions = jnp.take_along_axis(positions, rows, axis=1)
      mask = jnp.take_along_axis(jnp.broadcast_to(mask, (x.shape[0], *mask.shape[1:])),
                                 rows[..., None], axis=1)
    q = _dense(cfg, (heads, head_dim), ("embed", "heads", "head_dim"), name="query")(queried)
    k = _dense(cfg, (kv_heads, head_dim), ("embed", "kv_heads", "head_dim"), name="key")(x)
    v = _dense(cfg, (kv_heads, head_dim), ("embed", "kv_heads", "head_dim"), name="value")(x)
    inv_freq = attention.rope_frequencies(cfg)
    q = nn.with_logical_constraint(attention.rope(q, query_positions, cfg.rope_theta, inv_freq),
                                   ("batch", "length", "heads", "head_dim"))
    k = nn.with_logical_constraint(attention.rope(k, positions, cfg.rope_theta, inv_freq),
                                   ("batch", "length", "kv_heads", "head_dim"))
    v = nn.with_logical_constraint(v, ("batch", "length", "kv_heads", "head_dim"))
    kv = (k, v)
    if packed is not None:
      if cache is None or mask is not None or rows is not None or cfg.parscale.prefix_len:
        raise ValueError("packed attention reads the rows' caches under its own causal order: "
                         "pass a cache, and no mask, rows or ParScale prefix")
      out, kv = packed(q, k, v, *cache)
    elif cfg.parscale.prefix_len:
      if cache is not None:
        kv = (write_slots(cache[0], k, cache[2]), write_slots(cache[1], v, cache[2]))
      prefix = parscale.Prefix(cfg, name="prefix")(x.shape[0])
      before = None if cache is None else (
          cache[0], cache[1], jnp.arange(cache[0].shape[2])[None, :] < cache[2][:, None])
      out = parscale.attend_with_prefix(q, k, v, mask, before, prefix)
    elif cache is not None:
      cache_k, cache_v, lengths = cache
      kv = (write_slots(cache_k, k, lengths), write_slots(cache_v, v, lengths))
      out = attention.attend_slots(q, *kv, attention.visible_slots(lengths, mask,
                                                                   cache_k.shape[2]))
    elif mask is None:
      out = attention.causal_attention(q, k, v, cfg.attention)
    else:
      out = dense_attention.attend(q, k, v, mask)
    out = nn.with_logical_constraint(out, ("batch", "length", "heads", "head_dim"))
    out = _dense(cfg, cfg.d_model, ("heads", "head_dim", "embed"), contract=2,
                 std=_residual_std(cfg), name="out")(out)
    return out, kv


class Mlp(nn.Module):
  """SwiGLU: down(silu(gate(x)) * up(x)), the gate with a fused backward (`fused.swiglu`)."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, T, E] -> [B, T, E]."""
    cfg = self.config
    gate = _dense(cfg, cfg.mlp_dim, ("embed", "mlp"), name="gate")(x)
    up = _dense(cfg, cfg.mlp_dim, ("embed", "mlp"), name="up")(x)
    h = nn.with_logical_constraint(fused.swiglu(gate, up), ("batch", "length", "mlp"))
    return _dense(cfg, cfg.d_model, ("mlp", "embed"), std=_residual_std(cfg), name="down")(h)


class Block(nn.Module):
  """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x, positions, mask=None, cache=None, rows=None, packed=None):
    """Same arguments and returns as `Attention`, with x the [B, T, E] residual stream (`rows`:
    the output is the [B, R, E] stream of those tokens only)."""
    cfg = self.config
    norm = lambda name: RMSNorm(cfg.norm_eps, jnp.dtype(cfg.dtype), name=name)
    h, kv = Attention(cfg, name="attention")(norm("attention_norm")(x), positions, mask, cache,
                                             rows, packed)
    if rows is not None:
      x = jnp.take_along_axis(x, rows[..., None], axis=1)
    x = x + h
    x = x + Mlp(cfg, name="mlp")(norm("mlp_norm")(x))
    return nn.with_logical_constraint(x, ("batch", "length", "embed")), kv


# Rematerialisation policies of the blocks (`Transformer.remat`, set by `train.remat`): what each
# block keeps from its forward pass for the backward pass; the rest is recomputed.
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,  # only the block's input
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # the projections' outputs
}


class Transformer(nn.Module):
  """The decoder. `config` must pass `ModelConfig.validate()`.

  `remat` ("none" or a `REMAT_POLICIES` name) wraps each block in `nn.remat` with that policy:
  training memory for recomputation, the parameters and outputs unchanged.
  """

  config: ModelConfig
  remat: str = "none"

  def setup(self):
    cfg = self.config
    self.embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=jnp.dtype(cfg.dtype),
                          embedding_init=_normal(cfg.init_std, ("vocab", "embed")))
    block = Block if self.remat == "none" else nn.remat(Block, policy=REMAT_POLICIES[self.remat])
    self.blocks = [block(cfg) for _ in range(cfg.num_layers)]
    self.final_norm = RMSNorm(cfg.norm_eps, jnp.dtype(cfg.dtype))
    if not cfg.tie_embeddings:
      self.head = _dense(cfg, cfg.vocab_size, ("embed", "vocab"))
    if cfg.parscale.streams > 1:
      self.aggregator = parscale.Aggregator(cfg)

  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
               mask: jax.Array | None = None) -> jax.Array:
    """Cache-free forward over whole sequences.

    Args:
      tokens: [B, T] int32.
      positions: [B, T] int32 position ids; None means 0..T-1.
      mask: [B or 1, T, T] bool, mask[b, i, j] = token i may attend to token j (dense attention;
        the non-causal models of `models.diffusion` and `models.asarm` pass their own); None
        means causal with the implementation of `config.attention`.
    Returns:
      [B, T, V] float32 logits.
    """
    if positions is None:  # static, so that the rotary sines and cosines are constants
      positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
    return self._logits(self._causal(tokens, positions, mask)[0])

  def prefill(self, tokens: jax.Array, positions: jax.Array,
              cache: KVCache) -> tuple[jax.Array, KVCache]:
    """Cache-free causal forward of T new tokens per row that also writes them into the cache.

    Equals `decode(tokens, positions, cache)` on an empty cache, but attention is that of
    `config.attention` (sequence-parallel on a mesh with a 'sequence' axis). The cache's contents
    are not attended to, so it must be empty (all lengths 0). Tokens are right-padded to the
    length multiple the attention needs; causal attention makes the padding invisible to them,
    and its logits and keys/values are dropped.

    Args:
      tokens: [B, T] int32; positions: [B, T] int32 their position ids.
      cache: an empty KVCache with S slots per row.
    Returns:
      ([B, T, V] float32 logits, cache with the tokens written and lengths + T).
    """
    steps = tokens.shape[1]
    pad = ((0, 0), (0, -steps % attention.length_multiple(self.config.attention)))
    x, keys, values = self._causal(jnp.pad(tokens, pad), jnp.pad(positions, pad, mode="edge"))
    rows = self._append(parscale.fold_cache(cache), [k[:, :steps] for k in keys],
                        [v[:, :steps] for v in values])
    return self._logits(x[:, :steps]), parscale.unfold_cache(rows, cache)

  def decode(self, tokens: jax.Array, positions: jax.Array, cache: KVCache,
             attention_mask: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
    """Cached forward of T new tokens per row.

    New token i of row b attends to cache slots < cache.lengths[b] and to new tokens j with
    attention_mask[b, i, j]; its keys/values are then written at slot cache.lengths[b] + i.

    Args:
      tokens: [B, T] int32 new tokens.
      positions: [B, T] int32 their position ids (independent of slots).
      cache: KVCache with S slots per row (a `parscale.StreamCache` when P > 1).
      attention_mask: [B, T, T] bool over the new tokens; None means causal (j <= i).
    Returns:
      ([B, T, V] float32 logits, cache with the new tokens written and lengths + T).
    """
    steps = tokens.shape[1]
    if attention_mask is None:
      attention_mask = jnp.tril(jnp.ones((1, steps, steps), bool))
    attention_mask = parscale.fold_mask(attention_mask, self.config.parscale.streams)
    rows = parscale.fold_cache(cache)  # ParScale: one row per stream
    x, rows = self._cached_blocks(self._embed(tokens), self._streams(positions), rows,
                                  attention_mask)
    rows = rows.replace(lengths=rows.lengths + steps)
    return self._logits(x), parscale.unfold_cache(rows, cache)

  def decode_packed(self, tokens: jax.Array, positions: jax.Array, rows: jax.Array,
                    offsets: jax.Array, width: int, cache: KVCache) -> tuple[jax.Array, KVCache]:
    """Cached forward of token-packed new tokens from several rows (`attention.attend_packed`):
    the projections and MLP run on the T packed tokens only, whatever each row's count.

    Args:
      tokens, positions: [1, T] int32; rows, offsets: [T] int32 (rows >= B: padding);
      width: static, the most new tokens of a row; cache: KVCache with B rows.
    Returns:
      ([1, T, V] float32 logits, cache with the tokens written; lengths unchanged, for the
      caller to advance by each row's count).

    On a mesh the packed tokens are one "batch" row, so the call is not split over the data
    axes (tested on one device); `remat` does not apply (decoding only).
    """
    if self.config.parscale.streams > 1:
      raise ValueError("decode_packed: ParScale streams are not packed; use decode")
    layout = functools.partial(attention.attend_packed, rows=rows, offsets=offsets, width=width)
    x, cache = self._cached_blocks(self._embed(tokens), positions, cache, packed=layout)
    return self._logits(x), cache

  def decode_step_with_chunks(self, step_tokens: jax.Array, step_positions: jax.Array,
                              step_writes: jax.Array, chunk_tokens: jax.Array,
                              chunk_positions: jax.Array, chunk_rows: jax.Array,
                              chunk_last: jax.Array, cache: KVCache
                              ) -> tuple[jax.Array, jax.Array, KVCache]:
    """A decode step of every row with prompt chunks of K rows piggybacked on it, in one pass
    over the weights (`attention.attend_step_with_chunks`; chunked prefill inside decode steps,
    Sarathi-Serve).

    Args:
      step_tokens, step_positions: [B] int32 each row's next token; step_writes: [B] bool,
        whose is written into the cache (False for the chunks' rows).
      chunk_tokens, chunk_positions: [K, C] int32; chunk_rows: [K] int32 (B or more: padding);
        chunk_last: [K] int32 the offset in each chunk whose logits are wanted.
      cache: KVCache with B rows; lengths[b] is where row b's new tokens go.
    Returns:
      ([B, V] step logits, [K, V] logits at chunk_last, cache with the written tokens; lengths
      unchanged, for the caller to advance).
    """
    if self.config.parscale.streams > 1:
      raise ValueError("decode_step_with_chunks: ParScale streams are not packed; use decode")
    batch, (chunks, width) = step_tokens.shape[0], chunk_tokens.shape
    layout = functools.partial(attention.attend_step_with_chunks, step_writes=step_writes,
                               chunk_rows=chunk_rows, chunk_width=width)
    tokens = jnp.concatenate([step_tokens, chunk_tokens.reshape(-1)])[None]
    positions = jnp.concatenate([step_positions, chunk_positions.reshape(-1)])[None]
    x, cache = self._cached_blocks(self._embed(tokens), positions, cache, packed=layout)
    wanted = jnp.concatenate([jnp.arange(batch), batch + jnp.arange(chunks) * width + chunk_last])
    logits = self._logits(x[:, wanted])[0]
    return logits[:batch], logits[batch:], cache

  def _cached_blocks(self, x: jax.Array, positions: jax.Array, cache: KVCache,
                     mask: jax.Array | None = None, packed=None) -> tuple[jax.Array, KVCache]:
    """Every block over residual x with its layer of `cache` (`Block`'s mask / packed): the
    final residual and the cache with each layer's buffers updated (lengths unchanged)."""
    keys, values = [], []
    for layer, block in enumerate(self.blocks):
      layer_cache = (cache.keys[layer], cache.values[layer], cache.lengths)
      x, (k, v) = block(x, positions, mask, layer_cache, None, packed)
      keys.append(k)
      values.append(v)
    return x, cache.replace(keys=tuple(keys), values=tuple(values))

  def _causal(self, tokens: jax.Array, positions: jax.Array, mask: jax.Array | None = None
              ) -> tuple[jax.Array, list[jax.Array], list[jax.Array]]:
    """Cache-free blocks, causal unless `mask` [B or 1, T, T] is given: ([B, T, E] residual,
    per-layer keys and values [B, T, KVH, D])."""
    x, positions = self._embed(tokens), self._streams(positions)
    if mask is not None:
      mask = parscale.fold_mask(mask, self.config.parscale.streams)
    keys, values = [], []
    for block in self.blocks:
      x, (k, v) = block(x, positions, mask)
      keys.append(k)
      values.append(v)
    return x, keys, values

  @staticmethod
  def _append(cache: KVCache, keys: list[jax.Array], values: list[jax.Array]) -> KVCache:
    """Writes per-layer [B, T, KVH, D] keys/values at each row's length and advances it by T."""
    write = lambda buffers, new: tuple(write_slots(b, n, cache.lengths)
                                       for b, n in zip(buffers, new))
    return cache.replace(keys=write(cache.keys, keys), values=write(cache.values, values),
                         lengths=cache.lengths + keys[0].shape[1])

  def _streams(self, x: jax.Array) -> jax.Array:
    """[B, ...] -> [B * P, ...]: one row per ParScale stream (identity when P = 1)."""
    return parscale.fold(x, self.config.parscale.streams)

  def _embed(self, tokens: jax.Array) -> jax.Array:
    """[B, T] -> [B * P, T, E], the embeddings repeated for each ParScale stream."""
    return nn.with_logical_constraint(self._streams(self.embed(tokens)),
                                      ("batch", "length", "embed"))

  def _logits(self, x: jax.Array) -> jax.Array:
    """[B * P, T, E] final residual streams -> [B, T, V] float32 logits."""
    x = self.final_norm(x)
    if self.config.parscale.streams > 1:
      x = self.aggregator(x)
    logits = self.embed.attend(x) if self.config.tie_embeddings else self.head(x)
    return nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "length", "vocab"))

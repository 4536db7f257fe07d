"""ParScale: P parallel streams of one decoder (Chen et al. 2025, "Parallel Scaling Law for
Language Models"), the pieces the Llama decoder (`models/llama.py`) adds when
`ModelConfig.parscale.streams` P > 1 or `parscale.prefix_len` M > 0.

* The P streams share every weight of the decoder. They run as one batched computation: the
  [B, ...] inputs are folded into B * P rows, row b * P + j being stream j of row b (`fold`).
* Stream j has its own learnable key/value prefix of M slots in every layer (`Prefix`, prefix
  tuning). Every token of the stream attends to them (`attend_with_prefix`); they carry no
  position and are not stored in the KV cache, so cache slots, pointers, rollback and slot
  compaction mean exactly what they mean without ParScale.
* The P final normalised hidden states h_j of a position are combined by a learned dynamic
  aggregation (`Aggregator`): w = softmax(MLP([h_1; ...; h_P])), smoothed to
  (1 - eps) w + eps / P, and sum_j w_j h_j goes through the shared output head.
* The KV cache holds one cache per stream (`StreamCache`: per layer [B, P, KVH, S, D]) with one write
  pointer per row b, shared by its P streams, so samplers see an ordinary per-row cache.

With P = 1 and M = 0 none of this exists: the model, its parameters and its cache are the base
decoder's.
"""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from models import attention
from models.config import ModelConfig
from models.kv_cache import KVCache


def fold(x: jax.Array, streams: int) -> jax.Array:
  """[B, ...] -> [B * P, ...], row b * P + j = x[b] (stream j of row b)."""
  return x if streams == 1 else jnp.repeat(x, streams, axis=0)


def fold_mask(mask: jax.Array, streams: int) -> jax.Array:
  """Attention mask [B or 1, T, T] -> [B * P or 1, T, T] (a broadcast row stays broadcast)."""
  return mask if mask.shape[0] == 1 else fold(mask, streams)


@flax.struct.dataclass
class StreamCache:
  """One key/value cache per stream, with one write pointer per row (shared by its streams).

  Attributes:
    keys: L buffers [B, P, KVH, S, D] of rotated keys, one per layer, compute dtype.
    values: L buffers [B, P, KVH, S, D] of values.
    lengths: [B] int32 number of valid slots per row (the same in each of its streams).
  """

  keys: tuple[jax.Array, ...]
  values: tuple[jax.Array, ...]
  lengths: jax.Array

  @property
  def max_len(self) -> int:
    """S, the number of slots per row and stream."""
    return self.keys[0].shape[3]

  @classmethod
  def zeros(cls, num_layers: int, batch: int, streams: int, max_len: int, num_kv_heads: int,
            head_dim: int, dtype) -> StreamCache:
    """An empty cache: all rows at length 0."""
    shape = (batch, streams, num_kv_heads, max_len, head_dim)
    return cls(keys=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
               values=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
               lengths=jnp.zeros((batch,), jnp.int32))

  @staticmethod
  def logical_axes(num_layers: int) -> StreamCache:
    """Logical axis names of each field, as a StreamCache of PartitionSpecs (for jit shardings)."""
    kv = tuple(PartitionSpec("batch", "streams", "kv_heads", "cache_length", "head_dim")
               for _ in range(num_layers))
    return StreamCache(keys=kv, values=kv, lengths=PartitionSpec("batch"))

  def folded(self) -> KVCache:
    """The same cache as a KVCache over B * P stream rows (a reshape, no copy)."""
    rows = lambda a: a.reshape((a.shape[0] * a.shape[1],) + a.shape[2:])
    streams = self.keys[0].shape[1]
    return KVCache(keys=tuple(map(rows, self.keys)), values=tuple(map(rows, self.values)),
                   lengths=fold(self.lengths, streams))

  def unfolded(self, rows: KVCache) -> StreamCache:
    """`rows` (a `folded()` cache after a call) back in this cache's layout."""
    shape = self.keys[0].shape
    streams = shape[1]
    back = lambda a: a.reshape(shape)
    return StreamCache(keys=tuple(map(back, rows.keys)), values=tuple(map(back, rows.values)),
                       lengths=rows.lengths[::streams])


def fold_cache(cache: KVCache | StreamCache) -> KVCache:
  """The cache over stream rows: a StreamCache folded, a KVCache (P = 1) as it is."""
  return cache.folded() if isinstance(cache, StreamCache) else cache


def unfold_cache(rows: KVCache, like: KVCache | StreamCache) -> KVCache | StreamCache:
  """Inverse of `fold_cache(like)` for the cache `rows` after a call."""
  return like.unfolded(rows) if isinstance(like, StreamCache) else rows


class Prefix(nn.Module):
  """One layer's learnable key/value prefixes: M slots per stream, per kv head.

  Returns ([R, M, KVH, D] keys, values) in compute dtype for R = B * P stream rows (row
  b * P + j gets stream j's prefix). The keys are used as they are (no rotary position).
  """

  config: ModelConfig

  @nn.compact
  def __call__(self, rows: int) -> tuple[jax.Array, jax.Array]:
    cfg = self.config
    streams = cfg.parscale.streams
    shape = (streams, cfg.parscale.prefix_len, cfg.num_kv_heads, cfg.resolved_head_dim)
    init = nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std),
                                        ("streams", "prefix", "kv_heads", "head_dim"))
    tile = lambda p: jnp.tile(p.astype(cfg.dtype), (rows // streams, 1, 1, 1))
    return tile(self.param("key", init, shape, jnp.float32)), tile(
        self.param("value", init, shape, jnp.float32))


def attend_with_prefix(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
                       cache: tuple | None, prefix: tuple[jax.Array, jax.Array]) -> jax.Array:
  """`attention.attend` where every query also sees its stream's prefix slots.

  Args:
    q: [R, T, H, D]; k, v: [R, T, KVH, D] the new tokens' (rotated) keys and values.
    mask: [R or 1, T, T] bool over the new tokens, or None for causal.
    cache: None or (keys [R, KVH, S, D], values, valid [R, S]) as in `attention.attend`.
    prefix: ([R, M, KVH, D] keys, values) from `Prefix`.
  Returns:
    [R, T, H, D] in q's dtype.
  """
  steps = q.shape[1]
  if mask is None:
    mask = jnp.tril(jnp.ones((1, steps, steps), bool))
  seen = jnp.ones(mask.shape[:2] + (prefix[0].shape[1],), bool)
  return attention.attend(q, jnp.concatenate([prefix[0], k], axis=1),
                          jnp.concatenate([prefix[1], v], axis=1),
                          jnp.concatenate([seen, mask], axis=-1), *(cache or ()))


class Aggregator(nn.Module):
  """Dynamic aggregation of the P streams' final normalised hidden states.

  w = softmax(MLP([h_1; ...; h_P])) with MLP = Linear(P * E -> E), SiLU, Linear(E -> P), as in
  the paper; weights smoothed to (1 - eps) w + eps / P so that no stream is switched off early in
  training; output sum_j w_j h_j.
  """

  config: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B * P, T, E] stream rows -> [B, T, E] in compute dtype (weights in float32)."""
    cfg = self.config
    streams, width = cfg.parscale.streams, cfg.d_model
    h = x.reshape((x.shape[0] // streams, streams) + x.shape[1:]).swapaxes(1, 2)  # [B, T, P, E]

    def kernel(name, shape, names):
      init = nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), names)
      return self.param(name, init, shape, jnp.float32).astype(cfg.dtype)

    hidden = jnp.tensordot(h.astype(cfg.dtype), kernel("hidden", (streams, width, width),
                                                        ("streams", "embed", "mlp")), axes=2)
    scores = jnp.tensordot(nn.silu(hidden), kernel("out", (width, streams), ("mlp", "streams")),
                           axes=1)
    weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1)
    weights = (1.0 - cfg.parscale.smoothing) * weights + cfg.parscale.smoothing / streams
    out = jnp.einsum("btp,btpe->bte", weights, h.astype(jnp.float32))
    return nn.with_logical_constraint(out.astype(cfg.dtype), ("batch", "length", "embed"))

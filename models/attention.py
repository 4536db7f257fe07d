"""Pure attention math of the decoder: rotary embeddings, dense grouped-query attention, and the
choice of cache-free causal attention (`ModelConfig.attention`).

Kept apart from the linen modules; the sequence-parallel variants live in
`parallelism.sequence_attention` and compute what `attend` computes for a cache-free call.
"""

from __future__ import annotations

import contextlib
import math

import jax
import jax.numpy as jnp
import numpy as np

from models import dense_attention
from models.config import ModelConfig
from parallelism import sequence_attention

# Finite rather than -inf: a fully masked row then softmaxes to uniform instead of NaN.
_MASKED = -1e30


def rope(x: jax.Array, positions: jax.Array | np.ndarray, theta: float,
         inv_freq: jax.Array | np.ndarray | None = None) -> jax.Array:
  """Rotates feature pairs (i, i + D/2) by angle `position * theta**(-2i/D)` (Llama/NeoX layout).

  Positions given as a numpy array (a cache-free forward's 0..T-1, known when tracing) make the
  rotation's sines and cosines constants of the program. Computed from traced positions, XLA:CPU
  fuses sin and cos into every consumer, evaluating them once per head and again in the backward
  pass: 8% of a train step of the 12 x d256 model at T = 256.

  Args:
    x: [B, T, H, D] queries or keys, any float dtype.
    positions: [B, T] int32 position ids (a jax array, or a numpy array when static).
    theta: rotary base.
    inv_freq: [D/2] float32 frequencies replacing `theta**(-2i/D)` (scaled RoPE), or None.
  Returns:
    [B, T, H, D] in x's dtype; the rotation itself is computed in float32.
  """
  static = isinstance(positions, np.ndarray) and not isinstance(inv_freq, jax.Array)
  if static and (positions == positions[:1]).all():
    positions = positions[:1]  # one row, broadcast over the batch
  # Static positions: evaluated now, by the same XLA operations, into constants of the program.
  with jax.ensure_compile_time_eval() if static else contextlib.nullcontext():
    half = x.shape[-1] // 2
    if inv_freq is None:
      inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = jnp.asarray(positions).astype(jnp.float32)[..., None] * inv_freq  # [B or 1, T, D/2]
    sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def rope_frequencies(cfg: ModelConfig) -> np.ndarray | None:
  """[D/2] float32 rotary frequencies of a scaled RoPE (`cfg.rope_scaling`), or None (unscaled).

  Follows Hugging Face transformers' "linear" and "llama3" rope types (Llama 3.1), computed in
  float32 as there, so imported checkpoints see the same angles.
  """
  if cfg.rope_scaling == "none":
    return None
  dim = cfg.resolved_head_dim
  inv_freq = (1.0 / (np.float32(cfg.rope_theta)
                     ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))))
  factor = np.float32(cfg.rope_factor)
  if cfg.rope_scaling == "linear":
    return (inv_freq / factor).astype(np.float32)
  low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
  old_len = cfg.rope_original_max_len
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
  smooth = (old_len / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
           cache_k: jax.Array | None = None, cache_v: jax.Array | None = None,
           cache_mask: jax.Array | None = None) -> jax.Array:
  """Softmax attention of T new queries over an optional cache plus the T new keys.

  The cache is only read: its scores and the new tokens' scores share one softmax, so the
  caller can write the new keys/values afterwards in a single small update.

  Args:
    q: [B, T, H, D] rotated queries.
    k: [B, T, KVH, D] rotated keys of the new tokens; KVH divides H (grouped-query attention).
    v: [B, T, KVH, D] values of the new tokens.
    mask: [B or 1, T, T] bool, mask[b, i, j] = new query i may attend to new key j.
    cache_k: [B, KVH, S, D] cached keys (the `KVCache` layout), or None for a cache-free call.
    cache_v: [B, KVH, S, D] cached values.
    cache_mask: [B, S] bool, which cache slots are valid.
  Returns:
    [B, T, H, D] in q's dtype; scores and softmax are computed in float32.
  """
  batch, steps, heads, head_dim = q.shape
  kv_heads = k.shape[2]
  q = (q * head_dim**-0.5).reshape(batch, steps, kv_heads, heads // kv_heads, head_dim)

  def scores(keys, keep):  # keep: [B or 1, T or 1, S']
    s = jnp.einsum("btkgd,bskd->bkgts", q, keys, preferred_element_type=jnp.float32)
    return jnp.where(keep[:, None, None], s, _MASKED)

  def mix(probs, values):
    return jnp.einsum("bkgts,bskd->btkgd", probs.astype(values.dtype), values,
                      preferred_element_type=jnp.float32)

  new_scores = scores(k, mask)
  if cache_k is not None:  # [B, KVH, S, D] buffers -> [B, S, KVH, D]
    cache_k, cache_v = jnp.swapaxes(cache_k, 1, 2), jnp.swapaxes(cache_v, 1, 2)
  if cache_k is None:
    out = mix(jax.nn.softmax(new_scores, axis=-1), v)
  else:
    cached_scores = scores(cache_k, cache_mask[:, None, :])
    probs = jax.nn.softmax(jnp.concatenate([cached_scores, new_scores], axis=-1), axis=-1)
    slots = cache_k.shape[1]
    out = mix(probs[..., :slots], cache_v) + mix(probs[..., slots:], v)
  return out.reshape(batch, steps, heads, head_dim).astype(q.dtype)


def visible_slots(lengths: jax.Array, mask: jax.Array, slots: int) -> jax.Array:
  """Which cache slots each new token sees once the T new tokens are written at `lengths`.

  Args:
    lengths: [B] int32 valid slots per row before the new tokens.
    mask: [B or 1, T, T] bool, new token i may see new token j (written at lengths + j).
    slots: S.
  Returns:
    [B, T, S] bool: slot s is visible to new token i when s < lengths[b], or when s holds new
    token j = s - lengths[b] and mask[b, i, j].
  """
  steps = mask.shape[-1]
  relative = jnp.arange(slots)[None, :] - lengths[:, None]  # [B, S]: which new token, if any
  earlier = (relative < 0)[:, None, :]
  if steps == 1:
    return earlier | ((relative == 0)[:, None, :] & mask)
  is_new = relative[:, None, :] == jnp.arange(steps)[None, :, None]  # [B, T(j), S]
  return earlier | jnp.any(mask[:, :, :, None] & is_new[:, None, :, :], axis=2)


def _write_tokens(cache_k: jax.Array, cache_v: jax.Array, k: jax.Array, v: jax.Array,
                  rows: jax.Array, at: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Writes packed token t's key and value [1, T, KVH, D] at slot at[t] of row rows[t] of the
  [B, KVH, S, D] buffers; a row outside [0, B) (padding) or a slot past S is dropped."""
  write = lambda buffer, new: buffer.at[rows, :, at, :].set(new[0].astype(buffer.dtype),
                                                            mode="drop")
  return write(cache_k, k), write(cache_v, v)


def attend_packed(q: jax.Array, k: jax.Array, v: jax.Array, cache_k: jax.Array,
                  cache_v: jax.Array, lengths: jax.Array, rows: jax.Array, offsets: jax.Array,
                  width: int) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  """Attention of T token-packed new tokens, from any rows, against their rows' caches.

  A ragged call (e.g. a batch's speculative drafts, a different number per row) packs its new
  tokens into one sequence so that the projections and the MLP cost what the tokens need, not
  rows x the longest. Token t is the `offsets[t]`-th new token of row `rows[t]`: its key and
  value are written at slot lengths[row] + offset, and it sees the row's cache below that and the
  row's new tokens up to itself. The attention itself runs on the rows' dense [B, width] layout
  (`attend_slots`), where it is a small part of a call.

  Args:
    q: [1, T, H, D] rotated queries; k, v: [1, T, KVH, D] the new keys and values.
    cache_k, cache_v: [B, KVH, S, D] the layer's buffers; lengths: [B] valid slots per row.
    rows: [T] int32 each token's row; B or more (or negative) marks padding, written and seen
      nowhere.
    offsets: [T] int32 each token's place among its row's new tokens, in [0, width); a row's
      offsets must be 0..count - 1 (its tokens are consecutive slots after its length).
    width: W (static), the most new tokens of any row.
  Returns:
    ([1, T, H, D] output (padding's is garbage), (cache_k, cache_v) with the tokens written).
  """
  batch, slots = cache_k.shape[0], cache_k.shape[2]
  valid = (rows >= 0) & (rows < batch)
  row = jnp.clip(rows, 0, batch - 1)
  target_row = jnp.where(valid, row, batch)  # padding: out of range, dropped
  cache_k, cache_v = _write_tokens(cache_k, cache_v, k, v, target_row, lengths[row] + offsets)
  dense_q = jnp.zeros((batch, width, *q.shape[2:]), q.dtype).at[target_row, offsets].set(
      q[0], mode="drop")
  causal = jnp.tril(jnp.ones((1, width, width), bool))
  out = attend_slots(dense_q, cache_k, cache_v, visible_slots(lengths, causal, slots))
  return out[row, jnp.clip(offsets, 0, width - 1)][None], (cache_k, cache_v)


def attend_step_with_chunks(q: jax.Array, k: jax.Array, v: jax.Array, cache_k: jax.Array,
                            cache_v: jax.Array, lengths: jax.Array, step_writes: jax.Array,
                            chunk_rows: jax.Array, chunk_width: int
                            ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  """Attention of a decode step piggybacked with prompt chunks (Sarathi-Serve's mixed batch):
  one new token for each of the B rows, then C consecutive new tokens for each of K rows.

  Laid end to end, the call's projections and MLP run once over B + K x C tokens, where a
  separate prefill call would read the weights a second time. The attention keeps two dense
  layouts: the step's [B, 1] queries against every row's cache, as a decode step; each chunk's
  [1, C] queries against its own row only (gathered), causally, so a chunk costs what its row
  needs, not B x C. Step token b is written at lengths[b] (where step_writes[b]), chunk k's token
  j at lengths[chunk_rows[k]] + j; a row must not take both (a row being prefilled does not step).

  Args:
    q: [1, B + K C, H, D] rotated queries; k, v: [1, B + K C, KVH, D] the new keys and values.
    cache_k, cache_v: [B, KVH, S, D] the layer's buffers; lengths: [B] valid slots per row.
    step_writes: [B] bool, whose step token is written (and seen by itself).
    chunk_rows: [K] int32 each chunk's row; B or more (or negative) marks a padding chunk,
      written nowhere.
    chunk_width: C (static).
  Returns:
    ([1, B + K C, H, D] output (unwritten tokens' is garbage), (cache_k, cache_v) written).
  """
  batch, slots = cache_k.shape[0], cache_k.shape[2]
  chunks, width = chunk_rows.shape[0], chunk_width
  valid = (chunk_rows >= 0) & (chunk_rows < batch)
  chunk_row = jnp.clip(chunk_rows, 0, batch - 1)
  target = jnp.concatenate([jnp.where(step_writes, jnp.arange(batch), batch),
                            jnp.repeat(jnp.where(valid, chunk_row, batch), width)])
  at = jnp.concatenate([lengths, jnp.repeat(lengths[chunk_row], width)
                        + jnp.tile(jnp.arange(width), chunks)])
  cache_k, cache_v = _write_tokens(cache_k, cache_v, k, v, target, at)
  step = attend_slots(q[0, :batch, None], cache_k, cache_v,
                      visible_slots(lengths, jnp.ones((1, 1, 1), bool), slots))
  causal = jnp.tril(jnp.ones((1, width, width), bool))
  chunk = attend_slots(q[0, batch:].reshape(chunks, width, *q.shape[2:]), cache_k[chunk_row],
                       cache_v[chunk_row], visible_slots(lengths[chunk_row], causal, slots))
  out = jnp.concatenate([step[:, 0], chunk.reshape(chunks * width, *q.shape[2:])])
  return out[None], (cache_k, cache_v)


def attend_slots(q: jax.Array, cache_k: jax.Array, cache_v: jax.Array,
                 visible: jax.Array) -> jax.Array:
  """Softmax attention of T new queries over a layer's cache buffers, new tokens already written.

  The decode step's attention: one batched matmul over (row, kv head) against the slots, the
  query heads of a kv head and the new tokens folded into its rows, so nothing in the cache is
  transposed or copied.

  Args:
    q: [B, T, H, D] rotated queries.
    cache_k, cache_v: [B, KVH, S, D] the layer's keys and values (`KVCache` layout).
    visible: [B, T, S] bool (`visible_slots`).
  Returns:
    [B, T, H, D] in q's dtype; scores and softmax in float32.
  """
  batch, steps, heads, head_dim = q.shape
  kv_heads, slots = cache_k.shape[1], cache_k.shape[2]
  group = heads // kv_heads
  rows = (q * head_dim**-0.5).reshape(batch, steps, kv_heads, group, head_dim)
  rows = rows.transpose(0, 2, 3, 1, 4).reshape(batch, kv_heads, group * steps, head_dim)
  s = jnp.einsum("bkqd,bksd->bkqs", rows, cache_k, preferred_element_type=jnp.float32)
  keep = jnp.broadcast_to(visible[:, None, None], (batch, 1, group, steps, slots))
  s = jnp.where(keep.reshape(batch, 1, group * steps, slots), s, _MASKED)
  probs = jax.nn.softmax(s, axis=-1).astype(cache_v.dtype)
  out = jnp.einsum("bkqs,bksd->bkqd", probs, cache_v, preferred_element_type=jnp.float32)
  out = out.reshape(batch, kv_heads, group, steps, head_dim).transpose(0, 3, 1, 2, 4)
  return out.reshape(batch, steps, heads, head_dim).astype(q.dtype)


def block_causal_mask(positions: jax.Array, block_size: int) -> jax.Array:
  """Who may attend to whom in a denoiser: [B, T] int32 position ids -> [B, T, T] bool.

  Token i sees token j when j's block (position // block_size) is not later than i's: its own
  block and every earlier one (block diffusion). block_size 0 means one block: all-true
  (bidirectional).
  """
  if block_size == 0:
    return jnp.ones(positions.shape + positions.shape[-1:], bool)
  blocks = positions // block_size
  return blocks[:, None, :] <= blocks[:, :, None]


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, kind: str) -> jax.Array:
  """Cache-free causal self-attention with the implementation named by `ModelConfig.attention`.

  Args:
    q: [B, T, H, D] rotated queries; k, v: [B, T, KVH, D].
    kind: "dense" (`dense_attention.causal`: `attend` under a causal mask, with a hand-written
      backward pass and the invisible key blocks skipped) or a `parallelism.sequence_attention`
      variant, sequence-parallel over the context mesh's 'sequence' axis.
  Returns:
    [B, T, H, D] in q's dtype.
  """
  if kind == "dense":
    return dense_attention.causal(q, k, v)
  return sequence_attention.attention(q, k, v, kind=kind, causal=True)


def length_multiple(kind: str) -> int:
  """Sequence lengths `causal_attention(kind)` accepts on the context mesh are multiples of this."""
  return 1 if kind == "dense" else sequence_attention.length_multiple(kind, causal=True)

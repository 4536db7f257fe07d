"""Block (semi-autoregressive) diffusion decoding: the canvas is decoded in blocks of fixed
length, left to right; inside a block an unmasking rule (`samplers.unmask`) runs until the block
has no mask left (LLaDA's semi-AR remasking; Block Diffusion, Arriola et al. 2025; Fast-dLLM,
Wu et al. 2025).

`BlockConfig.cache` says how the other blocks are scored:

- "none": each step scores the whole canvas with `denoise` (later blocks still masked) and the
  rule commits only inside the current block.
- "exact": each step scores only the current block on top of a KV cache of the finished blocks,
  and a finished block is written into the cache by one more call (prompt-only blocks cost that
  one call each: a chunked prefill; the last block is never written). It needs a block-causal
  model whose blocks are these blocks (`model.block_size == block_length`): then the result
  equals "none" exactly, because no block attends to a later one.
- "prefix" and "dual": Fast-dLLM's approximate caches for a bidirectional denoiser. A block's
  first step scores the whole canvas and keeps every position's keys and values (the refresh);
  its later steps reuse them. "prefix" recomputes the current block and everything after it
  on top of the cached prefix; "dual" recomputes only the current block, on top of the cached
  prefix and suffix. Cached keys are stale by the tokens committed since the refresh (they do
  not see them), so the result approximates "none"; the `diffusion` bench measures how often a
  row differs. Exact cases (tested): a block decoded in one step (its only step is the
  refresh), and a one-layer model (its keys and values depend on their own token only). A block
  with no mask in any row costs nothing. `refresh_every` r > 0 refreshes every r-th step of a
  block (dKV-Cache's and Fast-dLLM v2's periodic refresh): staler keys for fewer whole-canvas
  calls; r = 1 decodes as "none" does. `fresh_window` w > 0 also recomputes the w positions
  before the block at every step, caching only the prefix before them: the keys that a newly
  committed token changes most are those nearest to it (the locality behind dLLM-Cache's and
  Sparse-dLLM's partial refreshes); a window reaching the canvas start decodes as "none" does.

Randomness: a row's n-th own denoising step (counted over its blocks; a step in which its current
block has no mask left is not its step) draws fold_in(row_key, n), [block_length, ...] uniforms.
So a row's tokens depend only on its canvas and key, never on the other rows of the batch (rows
whose blocks finish after other numbers of steps): alone, batched and vmapped give the same.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from samplers.core import canvas as canvas_lib
from samplers import unmask
from samplers.core import rng
from samplers.core.denoiser_protocol import Denoiser
from samplers.core.protocol import SampleOutput
from samplers.spec import SamplerSpec


CACHES = ("none", "exact", "prefix", "dual")
_FAST_DLLM = ("prefix", "dual")


@dataclasses.dataclass(frozen=True)
class BlockConfig:
  """Attributes:
    block_length: positions per block; must divide the canvas length.
    rule: the unmasking rule inside a block.
    cache: one of CACHES (see the module docstring): "exact" needs a `CachedDenoiser` with
      `block_size == block_length`; "prefix" and "dual" (approximate) a bidirectional one.
    refresh_every: with "prefix" or "dual", a block's steps per refresh: every refresh_every-th
      step of a block scores the whole canvas again (1: every step, which is decoding without
      the cache); 0 refreshes once per block, Fast-dLLM's schedule.
    fresh_window: with "prefix" or "dual", positions before the block that every step
      recomputes instead of reading from the cache (0: none, Fast-dLLM's caches).
  """

  block_length: int
  rule: unmask.UnmaskConfig = unmask.UnmaskConfig()
  cache: str = "exact"
  refresh_every: int = 0
  fresh_window: int = 0

  def __post_init__(self):
    if self.block_length < 1:
      raise ValueError(f"block_length must be >= 1, got {self.block_length}")
    if self.cache not in CACHES:
      raise ValueError(f"cache {self.cache!r} is unknown; valid: {', '.join(CACHES)}")
    if self.refresh_every < 0 or (self.refresh_every and self.cache not in _FAST_DLLM):
      raise ValueError(f"refresh_every={self.refresh_every} must be 0 (once per block) or a "
                       f"number of steps >= 1 with cache 'prefix' or 'dual' (got cache "
                       f"{self.cache!r})")
    if self.fresh_window < 0 or (self.fresh_window and self.cache not in _FAST_DLLM):
      raise ValueError(f"fresh_window={self.fresh_window} must be 0 or a number of positions "
                       f">= 1 with cache 'prefix' or 'dual' (got cache {self.cache!r})")
    if self.rule.slots is not None:
      raise ValueError(f"rule.slots={self.rule.slots}: continuous batching is for unmask.sample; "
                       f"block decoding runs all rows together, so leave rule.slots None")


def check_cache(model: Denoiser, config: BlockConfig) -> None:
  """ValueError when `config.cache` does not suit the model, naming the caches that do."""
  size = config.block_length
  if config.cache != "none" and not hasattr(model, "init_cache"):
    raise ValueError(f"cache={config.cache!r} needs a CachedDenoiser (init_cache/apply); "
                     f"pass cache='none' for this model")
  kind = ("bidirectional (block_size 0)" if not model.block_size else
          f"block-causal with blocks of {model.block_size}")
  if config.cache == "exact" and model.block_size != size:
    raise ValueError(
        f"the exact block cache needs a block-causal model whose blocks are the decoding blocks; "
        f"this model is {kind}, so cached finished blocks would never see the later ones and the "
        f"result would not be the model's. Use a block-causal model with "
        f"model.diffusion.block_size equal to sampler.block_length ({size}), decode without the "
        f"cache: cache='none' (`--set sampler.cache=none`), or with Fast-dLLM's approximate "
        f"caches of a bidirectional model: cache='prefix' or 'dual'")
  if config.cache in _FAST_DLLM and model.block_size:
    raise ValueError(f"cache={config.cache!r} (Fast-dLLM) is for a bidirectional denoiser; this "
                     f"model is {kind}: use cache='exact' with blocks of {model.block_size}")


@functools.partial(jax.jit, static_argnames=("model", "config"))
def sample(model: Denoiser, params, canvas: jax.Array, key: jax.Array,
           config: BlockConfig) -> SampleOutput:
  """Fills every mask of `canvas` [B, L] block by block.

  Args:
    model: a hashable `Denoiser` (a `CachedDenoiser` unless config.cache is "none");
      params: its parameters.
    canvas: [B, L] int32 with mask ids where tokens are generated; L a multiple of block_length.
    key: one key or one per row; the n-th denoising step of a row (counted over all blocks, only
      the steps in which the row's current block still has a mask) uses fold_in(row_key, n).
    config: static `BlockConfig`.
  Returns:
    SampleOutput with the completed canvas; stats `model_calls` (calls of the batch: denoising
    steps plus cache writes), `denoise_steps` (of the batch), `generated_tokens`,
    `tokens_per_call`; with "prefix" or "dual" also `refresh_calls` (whole-canvas calls: one per
    block with a mask, or one per refresh_every of its steps; counted in model_calls and
    denoise_steps).
  Raises:
    ValueError: if L is not a multiple of block_length, or the cache does not suit the model
      (`check_cache`).
  """
  canvas_lib.check_model(model, canvas)
  length = canvas.shape[1]
  if length % config.block_length:
    raise ValueError(f"the canvas length {length} is not divisible by block_length "
                     f"{config.block_length}; pad the canvas or choose a block length that "
                     f"divides it")
  check_cache(model, config)
  keys = rng.row_keys(key, canvas.shape[0])
  state = (canvas.astype(jnp.int32), jnp.zeros((canvas.shape[0],), jnp.int32), jnp.int32(0))
  if config.cache in _FAST_DLLM:
    return _fast_dllm(model, params, canvas, keys, config, state)
  return _block_by_block(model, params, canvas, keys, config, state)


def _commit(model, config: BlockConfig, keys, state, start, logits):
  """One unmasking step of the current block (from `start`) given its logits [B, size, V]:
  (tokens, steps, calls) advanced; a row whose block is done commits nothing and keeps its step
  count."""
  tokens, steps, calls = state
  size = config.block_length
  block = jax.lax.dynamic_slice_in_dim(tokens, start, size, axis=1)
  masked = block == model.mask_id
  u = canvas_lib.step_uniforms(keys, steps, (size, model.vocab_size + 1))
  block = unmask.step(config.rule, logits, block, masked, model.mask_id, u)
  steps = steps + jnp.any(masked, axis=1).astype(jnp.int32)
  return jax.lax.dynamic_update_slice_in_dim(tokens, block, start, axis=1), steps, calls + 1


def _block_has_mask(model, size: int, start):
  return lambda state: jnp.any(
      jax.lax.dynamic_slice_in_dim(state[0], start, size, axis=1) == model.mask_id)


def _block_by_block(model, params, canvas, keys, config: BlockConfig, state) -> SampleOutput:
  """The "none" and "exact" caches: a loop over blocks with one program for all of them."""
  batch, length = canvas.shape
  size = config.block_length
  blocks = length // size
  cached = config.cache == "exact"
  full = jnp.ones((batch, size, size), bool)

  def on_cache(cache, tokens, start):
    block = jax.lax.dynamic_slice_in_dim(tokens, start, size, axis=1)
    positions = jnp.broadcast_to(start + jnp.arange(size), (batch, size))
    return model.apply(params, block, positions, cache.replace(
        lengths=jnp.full((batch,), start, jnp.int32)), full)

  def decode_block(index, carry):
    state, cache = carry
    start = index * size

    def step(state):
      logits = (on_cache(cache, state[0], start)[0] if cached else
                jax.lax.dynamic_slice_in_dim(model.denoise(params, state[0]), start, size, 1))
      return _commit(model, config, keys, state, start, logits)

    state = jax.lax.while_loop(_block_has_mask(model, size, start), step, state)
    if cached:  # every finished block but the last is written
      cache = jax.lax.cond(index == blocks - 1, lambda c: c,
                           lambda c: on_cache(c, state[0], start)[1], cache)
    return state, cache

  cache = model.init_cache(batch, length) if cached else None
  (tokens, _, denoise), _ = jax.lax.fori_loop(0, blocks, decode_block, (state, cache))
  writes = blocks - 1 if cached else 0
  return canvas_lib.output(canvas, tokens, model.mask_id, denoise + writes, denoise_steps=denoise)


def _refresh_order(cache: str, begin: int, start: int, size: int,
                   length: int) -> tuple[np.ndarray, int]:
  """(the positions in their refresh slots [L], the first recomputed slot): "prefix" keeps the
  canvas order; "dual" moves the recomputed positions (the fresh window from `begin`, then the
  block from `start`) to the end, so that all the slots below them (kept during the block's
  steps) are the cached prefix and suffix."""
  order = np.arange(length)
  if cache == "prefix":
    return order, begin
  return np.concatenate([order[:begin], order[start + size:], order[begin:start + size]]), (
      length - (start + size - begin))


def _fast_dllm(model, params, canvas, keys, config: BlockConfig, state) -> SampleOutput:
  """The "prefix" and "dual" caches. Blocks are a Python loop: the prefix cache's steps score
  the canvas from the block on, a shape that differs per block.

  The refresh writes every position into the cache, the current block's last for "dual", so that
  a step's new block, written over its own slots, sees every other slot below `cache.lengths`
  (slot order is free: keys carry their rotary positions)."""
  batch, length = canvas.shape
  size = config.block_length
  every = config.refresh_every
  rows = lambda t: jnp.broadcast_to(t, (batch, len(t)))
  carry = (state, jnp.int32(0))  # and the refreshes so far
  for start in range(0, length, size):
    begin = max(0, start - config.fresh_window)  # recomputed from here at every step
    order, at = _refresh_order(config.cache, begin, start, size, length)
    has_mask = _block_has_mask(model, size, start)

    def refreshed(carry, start=start, begin=begin, order=order, at=at, has_mask=has_mask):
      """A refresh and its step, then cached steps until the block is done or the next refresh
      is due (after `every` steps; never with `every` 0)."""
      state, refreshes = carry
      logits, cache = model.apply(params, state[0][:, order], rows(order),
                                  model.init_cache(batch, length),
                                  jnp.ones((batch, length, length), bool))
      block = at + start - begin  # the block's first slot
      state = _commit(model, config, keys, state, start, logits[:, block:block + size])
      cache = cache.replace(lengths=jnp.full((batch,), at, jnp.int32))

      def step(inner):
        state, taken = inner
        stop = length if config.cache == "prefix" else start + size
        new = state[0][:, begin:stop]
        logits, _ = model.apply(params, new, rows(np.arange(begin, stop)), cache,
                                jnp.ones((batch, stop - begin, stop - begin), bool))
        return (_commit(model, config, keys, state, start,
                        logits[:, start - begin:start - begin + size]), taken + 1)

      more = ((lambda inner: has_mask(inner[0])) if not every else
              (lambda inner: has_mask(inner[0]) & (inner[1] < every)))
      state, _ = jax.lax.while_loop(more, step, (state, jnp.int32(1)))
      return state, refreshes + 1

    carry = jax.lax.while_loop(lambda c, has_mask=has_mask: has_mask(c[0]), refreshed, carry)
  (tokens, _, calls), refreshes = carry
  return canvas_lib.output(canvas, tokens, model.mask_id, calls, denoise_steps=calls,
                           refresh_calls=refreshes)


@dataclasses.dataclass(frozen=True)
class BlockOptions:
  """`sampler.*` settings of kind "block" (a masked-diffusion model): blocks of block_length,
  the unmasking rule inside each (fields as `unmask.UnmaskOptions`), and how the other blocks are
  scored, `cache`: "exact" (the default: finished blocks KV-cached, only for a block-causal model
  with model.diffusion.block_size == block_length), "none" (the whole canvas every step), or
  Fast-dLLM's approximate "prefix" or "dual" caches of a bidirectional model, refreshed once per
  block, or every `refresh_every` steps of a block, recomputing the `fresh_window` positions
  before the block at every step. The generation is shortened to whole blocks.
  """

  block_length: int = 16
  cache: str = "exact"
  rule: str = "threshold"
  confidence: str = "max_prob"
  k: int = 1
  threshold: float = 0.9
  factor: float = 1.0
  refresh_every: int = 0
  fresh_window: int = 0


def _whole_blocks(options: BlockOptions, prompt_len: int, max_new: int) -> int:
  return max_new - (prompt_len + max_new) % options.block_length


SPEC = SamplerSpec(
    "block", BlockOptions, sample,
    lambda o, decode: BlockConfig(o.block_length, unmask.rule_of(o, decode), o.cache,
                                  o.refresh_every, o.fresh_window),
    model="denoiser", fit=_whole_blocks)

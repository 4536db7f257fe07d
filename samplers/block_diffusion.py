"""Block (semi-autoregressive) diffusion decoding: the canvas is decoded in blocks of fixed
length, left to right; inside a block an unmasking rule (`samplers.unmask`) runs until the block
has no mask left (LLaDA's semi-AR remasking; Block Diffusion, Arriola et al. 2025; Fast-dLLM).

Cache-free (`cached=False`), each step scores the whole canvas with `denoise` (later blocks still
masked) and the rule only commits inside the current block. Cached (`cached=True`, a
`CachedDenoiser`), each step scores only the current block on top of a KV cache of the finished
blocks, and a finished block is written into the cache by one more call (prompt-only blocks cost
that one call each: a chunked prefill; the last block is never written). Caching needs a
block-causal model whose blocks are these blocks (`model.block_size == block_length`): then the
cached result equals the cache-free one exactly, because no block attends to a later one. With
any other model (a bidirectional one: block_size 0) the finished blocks' cached keys and values
never see the later blocks, so the result is only an approximation: `sample` refuses it unless
`approximate_cache=True` asks for it (the `diffusion` bench does, to measure the deviation).

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

from samplers.core import canvas as canvas_lib
from samplers import unmask
from samplers.core import rng
from samplers.core.denoiser_protocol import Denoiser
from samplers.core.protocol import SampleOutput
from samplers.spec import SamplerSpec


@dataclasses.dataclass(frozen=True)
class BlockConfig:
  """Attributes:
    block_length: positions per block; must divide the canvas length.
    rule: the unmasking rule inside a block.
    cached: score blocks on a KV cache of the finished ones (needs a `CachedDenoiser` with
      `block_size == block_length`, or `approximate_cache`).
    approximate_cache: allow `cached` with a model whose blocks are not these blocks (a
      bidirectional one): an approximation, not the model's decoding (for measuring it).
  """

  block_length: int
  rule: unmask.UnmaskConfig = unmask.UnmaskConfig()
  cached: bool = True
  approximate_cache: bool = False

  def __post_init__(self):
    if self.block_length < 1:
      raise ValueError(f"block_length must be >= 1, got {self.block_length}")
    if self.rule.slots is not None:
      raise ValueError(f"rule.slots={self.rule.slots}: continuous batching is for unmask.sample; "
                       f"block decoding runs all rows together, so leave rule.slots None")


@functools.partial(jax.jit, static_argnames=("model", "config"))
def sample(model: Denoiser, params, canvas: jax.Array, key: jax.Array,
           config: BlockConfig) -> SampleOutput:
  """Fills every mask of `canvas` [B, L] block by block.

  Args:
    model: a hashable `Denoiser` (a `CachedDenoiser` when config.cached); params: its parameters.
    canvas: [B, L] int32 with mask ids where tokens are generated; L a multiple of block_length.
    key: one key or one per row; the n-th denoising step of a row (counted over all blocks, only
      the steps in which the row's current block still has a mask) uses fold_in(row_key, n).
    config: static `BlockConfig`.
  Returns:
    SampleOutput with the completed canvas; stats `model_calls` (denoising steps of the batch
    plus cache writes), `denoise_steps` (of the batch), `generated_tokens`, `tokens_per_call`.
  Raises:
    ValueError: if L is not a multiple of block_length, or the model cannot be cached (not a
      `CachedDenoiser`, or, without approximate_cache, model.block_size != block_length).
  """
  canvas_lib.check_model(model, canvas)
  batch, length = canvas.shape
  size = config.block_length
  if length % size:
    raise ValueError(f"the canvas length {length} is not divisible by block_length {size}; "
                     f"pad the canvas or choose a block length that divides it")
  if config.cached and not hasattr(model, "init_cache"):
    raise ValueError("cached block decoding needs a CachedDenoiser (init_cache/apply); "
                     "pass cached=False for this model")
  if config.cached and not config.approximate_cache and model.block_size != size:
    kind = ("bidirectional (block_size 0)" if not model.block_size else
            f"block-causal with blocks of {model.block_size}")
    raise ValueError(
        f"cached block decoding is exact only with a block-causal model whose blocks are the "
        f"decoding blocks; this model is {kind}, so the cached finished blocks would never see "
        f"the later ones and the result would not be the model's. Use a block-causal model with "
        f"model.diffusion.block_size equal to sampler.block_length ({size}), or decode without "
        f"the cache: cached=False (`--set sampler.cached=false`); "
        f"BlockConfig(approximate_cache=True) accepts the approximation knowingly")
  blocks = length // size
  keys = rng.row_keys(key, batch)
  full = jnp.ones((batch, size, size), bool)

  def score(tokens, block, cache, start):
    if config.cached:
      positions = jnp.broadcast_to(start + jnp.arange(size), (batch, size))
      logits, _ = model.apply(params, block, positions, cache.replace(
          lengths=jnp.full((batch,), start, jnp.int32)), full)
      return logits
    return jax.lax.dynamic_slice_in_dim(model.denoise(params, tokens), start, size, axis=1)

  def decode_block(index, state):
    tokens, cache, steps, denoise = state
    start = index * size

    def step(inner):
      tokens, steps, denoise = inner
      block = jax.lax.dynamic_slice_in_dim(tokens, start, size, axis=1)
      masked = block == model.mask_id
      logits = score(tokens, block, cache, start)
      u = canvas_lib.step_uniforms(keys, steps, (size, model.vocab_size + 1))
      block = unmask.step(config.rule, logits, block, masked, model.mask_id, u)
      # a row whose block is done commits nothing and keeps its step count
      steps = steps + jnp.any(masked, axis=1).astype(jnp.int32)
      return jax.lax.dynamic_update_slice_in_dim(tokens, block, start, axis=1), steps, denoise + 1

    def unfinished(inner):
      block = jax.lax.dynamic_slice_in_dim(inner[0], start, size, axis=1)
      return jnp.any(block == model.mask_id)

    tokens, steps, denoise = jax.lax.while_loop(unfinished, step, (tokens, steps, denoise))
    if config.cached:
      def write(cache):
        block = jax.lax.dynamic_slice_in_dim(tokens, start, size, axis=1)
        positions = jnp.broadcast_to(start + jnp.arange(size), (batch, size))
        _, cache = model.apply(params, block, positions, cache.replace(
            lengths=jnp.full((batch,), start, jnp.int32)), full)
        return cache
      cache = jax.lax.cond(index == blocks - 1, lambda c: c, write, cache)
    return tokens, cache, steps, denoise

  cache = model.init_cache(batch, length) if config.cached else None
  state = (canvas.astype(jnp.int32), cache, jnp.zeros((batch,), jnp.int32), jnp.int32(0))
  tokens, _, _, denoise = jax.lax.fori_loop(0, blocks, decode_block, state)
  writes = blocks - 1 if config.cached else 0  # every finished block but the last
  return canvas_lib.output(canvas, tokens, model.mask_id, denoise + writes, denoise_steps=denoise)


@dataclasses.dataclass(frozen=True)
class BlockOptions:
  """`sampler.*` settings of kind "block" (a masked-diffusion model): blocks of block_length,
  the unmasking rule inside each (fields as `unmask.UnmaskOptions`), finished blocks KV-cached
  when `cached` (exact, and allowed, only for a block-causal model with
  model.diffusion.block_size == block_length; cached=false for any other, e.g. a bidirectional
  MDLM). The generation is shortened to whole blocks.
  """

  block_length: int = 16
  cached: bool = True
  rule: str = "threshold"
  confidence: str = "max_prob"
  k: int = 1
  threshold: float = 0.9
  factor: float = 1.0


def _whole_blocks(options: BlockOptions, prompt_len: int, max_new: int) -> int:
  return max_new - (prompt_len + max_new) % options.block_length


SPEC = SamplerSpec(
    "block", BlockOptions, sample,
    lambda o, decode: BlockConfig(o.block_length, unmask.rule_of(o, decode), o.cached),
    model="denoiser", fit=_whole_blocks)

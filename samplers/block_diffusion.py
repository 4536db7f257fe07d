"""Block (semi-autoregressive) diffusion decoding: the canvas is decoded in blocks of fixed
length, left to right; inside a block an unmasking rule (`samplers.unmask`) runs until the block
has no mask left (LLaDA's semi-AR remasking; Block Diffusion, Arriola et al. 2025; Fast-dLLM).

Cache-free (`cached=False`), each step scores the whole canvas with `denoise` (later blocks still
masked) and the rule only commits inside the current block. Cached (`cached=True`, a
`CachedDenoiser`), each step scores only the current block on top of a KV cache of the finished
blocks, and a finished block is written into the cache by one more call (prompt-only blocks cost
that one call each: a chunked prefill; the last block is never written). With a block-causal
model whose blocks are these blocks (`model.block_size == block_length`) the cached result equals
the cache-free one exactly, because no block attends to a later one; with a bidirectional model
the finished blocks' cached keys and values never see the later blocks, so the cached result is an
approximation whose deviation the `diffusion` bench measures.
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
    cached: score blocks on a KV cache of the finished ones (needs a `CachedDenoiser`).
  """

  block_length: int
  rule: unmask.UnmaskConfig = unmask.UnmaskConfig()
  cached: bool = True

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
    key: one key or one per row; the n-th denoising step of a row (counted over all blocks) uses
      fold_in(row_key, n).
    config: static `BlockConfig`.
  Returns:
    SampleOutput with the completed canvas; stats `model_calls` (denoising steps plus cache
    writes), `denoise_steps`, `generated_tokens`, `tokens_per_call`.
  Raises:
    ValueError: if L is not a multiple of block_length, or the model cannot be cached.
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
    tokens, cache, steps, calls = state
    start = index * size

    def step(inner):
      tokens, steps = inner
      block = jax.lax.dynamic_slice_in_dim(tokens, start, size, axis=1)
      logits = score(tokens, block, cache, start)
      u = canvas_lib.step_uniforms(keys, steps, (size, model.vocab_size + 1))
      block = unmask.step(config.rule, logits, block, block == model.mask_id, model.mask_id, u)
      return jax.lax.dynamic_update_slice_in_dim(tokens, block, start, axis=1), steps + 1

    def masked(inner):
      block = jax.lax.dynamic_slice_in_dim(inner[0], start, size, axis=1)
      return jnp.any(block == model.mask_id)

    tokens, new_steps = jax.lax.while_loop(masked, step, (tokens, steps))
    calls = calls + new_steps - steps
    if config.cached:
      def write(cache):
        block = jax.lax.dynamic_slice_in_dim(tokens, start, size, axis=1)
        positions = jnp.broadcast_to(start + jnp.arange(size), (batch, size))
        _, cache = model.apply(params, block, positions, cache.replace(
            lengths=jnp.full((batch,), start, jnp.int32)), full)
        return cache
      last = index == blocks - 1
      cache = jax.lax.cond(last, lambda c: c, write, cache)
      calls = calls + (~last).astype(jnp.int32)
    return tokens, cache, new_steps, calls

  cache = model.init_cache(batch, length) if config.cached else None
  state = (canvas.astype(jnp.int32), cache, jnp.int32(0), jnp.int32(0))
  tokens, _, steps, calls = jax.lax.fori_loop(0, blocks, decode_block, state)
  return canvas_lib.output(canvas, tokens, model.mask_id, calls, denoise_steps=steps)


@dataclasses.dataclass(frozen=True)
class BlockOptions:
  """`sampler.*` settings of kind "block" (a masked-diffusion model): blocks of block_length,
  the unmasking rule inside each (fields as `unmask.UnmaskOptions`), finished blocks KV-cached
  when `cached`. The generation is shortened to whole blocks.
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

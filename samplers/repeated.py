"""Repeated sampling: n independent samples per prompt as one vmapped program.

Any sampler with one of the standard signatures is `jax.vmap`-ed over n per-sample keys; its data
arguments, parameters and config are shared:

- causal: `sample_fn(*models_and_params, prompt [B, P], prompt_lengths [B], key, config)`
  (`ar.sample`, `speculative.sample`, `spectr.sample`, `tree.sample`, ...);
- canvas: `sample_fn(*models_and_params, canvas [B, L], key, config)` (the diffusion-style
  samplers: `mdlm`, `unmask`, `block_diffusion`, `edlm`, `assd`, `learned_unmask`).

`repeated.sample` passes whatever arrays come between the models and the key through unchanged,
each with a leading batch axis B. Sample i uses the key `fold_in(key, i)` (`sample_keys`), so
the n streams are independent and no key is reused; sample i is exactly what `sample_fn` returns
when called alone with that key (each row b of it, as always, uses row b of that key's split).

The prompt's prefill does not depend on the key, so under `vmap` it stays unbatched: it runs once
per prompt and its KV cache is broadcast to the n samples when the decode loop starts (the loop
carry is batched because the drawn tokens are). A model call a sampler skips with `lax.cond`
(mdlm's reused denoiser output, entropy_switch's large model) is not skipped under `vmap`: each
sample decides alone, so the cond runs both branches, and the samplers count those calls as run
(`samplers.core.cond_calls`). Large Language Monkeys (Brown et al. 2024) is the motivating use:
coverage grows with n, and selection (`samplers.selection`) picks one of the n.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from samplers.core.protocol import SampleOutput

# sample_fn(*models_and_params, *data, key, config) -> SampleOutput; data is (prompt [B, P],
# prompt_lengths [B]) for the causal samplers and (canvas [B, L],) for the canvas samplers
SampleFn = Callable[..., SampleOutput]


@flax.struct.dataclass
class RepeatedOutput:
  """n samples per prompt.

  Attributes:
    tokens: [B, n, ...] sample i of row b: [B, n, N] generated tokens (pad after each one's end)
      of a causal sampler, [B, n, L] completed canvases of a canvas sampler.
    lengths: [B, n] int32 generated tokens per sample (counting an emitted eos), or masks filled.
    stats: scalars: `model_calls` (batched model passes of the vmapped program: the shared
      prefill once, then as many decode passes as the longest-running sample needs; a call that
      a sampler skips with `lax.cond` alone runs at every step here, and is counted),
      `sample_model_calls` (the sum over samples of each one's `model_calls` in the vmapped
      program: the cost of n separate runs, except that calls a lone run skips with `lax.cond`
      count as run), `generated_tokens` (all samples together).
    sample_stats: every statistic of the wrapped sampler, [n] per sample.
  """

  tokens: jax.Array
  lengths: jax.Array
  stats: dict[str, jax.Array]
  sample_stats: dict[str, jax.Array]


def sample_keys(key: jax.Array, num_samples: int) -> jax.Array:
  """[n] typed keys fold_in(key, i), one independent stream per sample."""
  if num_samples < 1:
    raise ValueError(f"num_samples (n) must be >= 1, got {num_samples}")
  if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(key)
  if key.ndim != 0:
    raise ValueError(f"repeated sampling takes one key (it folds in the sample index); got key "
                     f"shape {key.shape}")
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(num_samples))


@functools.partial(jax.jit, static_argnums=(0, 1, -2, -1))
def sample(sample_fn: SampleFn, models: Sequence[Any], params: Sequence[Any],
           *args: Any) -> RepeatedOutput:
  """n samples per row from `sample_fn`, vmapped over per-sample keys.

  Called as `sample(sample_fn, models, params, *data, key, config, num_samples)`, e.g.
  `sample(ar.sample, (model,), (params,), prompt, prompt_lengths, key, config, n)` or
  `sample(unmask.sample, (denoiser,), (params,), canvas, key, config, n)`.

  Args:
    sample_fn: a sampler with a standard signature (static).
    models: its models, e.g. (model,) or (target, draft) (static, hashable).
    params: their parameters, in the same order; the sampler is called as
      sample_fn(models[0], params[0], models[1], params[1], ..., *data, key, config).
    *args: data: the sampler's arrays between its models and its key, each [B, ...] (prompt
      [B, P] and prompt_lengths [B], or a canvas [B, L]), shared by the n samples; then key: one
      key, sample i uses `sample_keys(key, n)[i]`; config: the sampler's static config (static);
      num_samples: n >= 1 (static).
  Returns:
    RepeatedOutput with tokens [B, n, ...].
  Raises:
    ValueError: no data, a data argument without the batch axis B of the first, or models and
      params of different lengths.
  """
  if len(args) < 4:
    raise ValueError(f"repeated.sample takes (sample_fn, models, params, *data, key, config, "
                     f"num_samples) with at least one data array; got {len(args)} arguments "
                     f"after params")
  *data, key, config, num_samples = args
  if len(models) != len(params):
    raise ValueError(f"got {len(models)} models but {len(params)} parameter sets; pass one "
                     "parameter set per model")
  shapes = [jnp.shape(x) for x in data]
  if any(len(shape) < 1 or shape[:1] != shapes[0][:1] for shape in shapes):
    raise ValueError(f"every data argument needs the same leading batch axis; got shapes "
                     f"{', '.join(str(tuple(shape)) for shape in shapes)}")
  leading = [x for pair in zip(models, params) for x in pair]
  keys = sample_keys(key, num_samples)
  out = jax.vmap(lambda k: sample_fn(*leading, *data, k, config))(keys)
  calls = out.stats["model_calls"]
  stats = {"model_calls": jnp.max(calls), "sample_model_calls": jnp.sum(calls),
           "generated_tokens": jnp.sum(out.lengths)}
  return RepeatedOutput(tokens=jnp.moveaxis(out.tokens, 0, 1), lengths=out.lengths.T,
                        stats=stats, sample_stats=out.stats)

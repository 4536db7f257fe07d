"""Repeated sampling: n independent samples per prompt as one vmapped program.

Any sampler with the standard signature `sample_fn(*models_and_params, prompt, prompt_lengths,
key, config) -> SampleOutput` (`ar.sample`, `speculative.sample`, `spectr.sample`, `tree.sample`,
a diffusion sampler, ...) is `jax.vmap`-ed over n per-sample keys; prompts, parameters and config
are shared. Sample i uses the key `fold_in(key, i)` (`sample_keys`), so the n streams are
independent and no key is reused; sample i is exactly what `sample_fn` returns when called alone
with that key.

The prompt's prefill does not depend on the key, so under `vmap` it stays unbatched: it runs once
per prompt and its KV cache is broadcast to the n samples when the decode loop starts (the loop
carry is batched because the drawn tokens are). Large Language Monkeys (Brown et al. 2024) is the
motivating use: coverage grows with n, and selection (`samplers.selection`) picks one of the n.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from samplers.core.protocol import SampleOutput

# sample_fn(*models_and_params, prompt [B, P], prompt_lengths [B], key, config) -> SampleOutput
SampleFn = Callable[..., SampleOutput]


@flax.struct.dataclass
class RepeatedOutput:
  """n samples per prompt.

  Attributes:
    tokens: [B, n, N] int32 generated tokens of sample i of prompt b; pad after each one's end.
    lengths: [B, n] int32 generated tokens per sample, counting an emitted eos.
    stats: scalars: `model_calls` (batched model passes of the vmapped program: the shared
      prefill once, then as many decode passes as the longest-running sample needs),
      `sample_model_calls` (the sum over samples of each one's own calls: the cost of n separate
      runs), `generated_tokens` (all samples together).
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


@functools.partial(jax.jit, static_argnames=("sample_fn", "models", "config", "num_samples"))
def sample(sample_fn: SampleFn, models: Sequence[Any], params: Sequence[Any], prompt: jax.Array,
           prompt_lengths: jax.Array, key: jax.Array, config: Any,
           num_samples: int) -> RepeatedOutput:
  """n samples per prompt from `sample_fn`, vmapped over per-sample keys.

  Args:
    sample_fn: a sampler with the standard signature (static).
    models: its models, e.g. (model,) or (target, draft) (static, hashable).
    params: their parameters, in the same order; the sampler is called as
      sample_fn(models[0], params[0], models[1], params[1], ..., prompt, prompt_lengths, key, config).
    prompt: [B, P] int32 right-padded prompts; prompt_lengths: [B] int32.
    key: one key; sample i uses `sample_keys(key, n)[i]`.
    config: the sampler's static config.
    num_samples: n >= 1.
  Returns:
    RepeatedOutput with tokens [B, n, N].
  """
  if len(models) != len(params):
    raise ValueError(f"got {len(models)} models but {len(params)} parameter sets; pass one "
                     "parameter set per model")
  leading = [x for pair in zip(models, params) for x in pair]
  keys = sample_keys(key, num_samples)
  out = jax.vmap(lambda k: sample_fn(*leading, prompt, prompt_lengths, k, config))(keys)
  calls = out.stats["model_calls"]
  stats = {"model_calls": 1 + jnp.max(calls - 1), "sample_model_calls": jnp.sum(calls),
           "generated_tokens": jnp.sum(out.lengths)}
  return RepeatedOutput(tokens=jnp.moveaxis(out.tokens, 0, 1), lengths=out.lengths.T,
                        stats=stats, sample_stats=out.stats)

"""Entropy-adaptive switching between a small and a large model (a two-model cascade).

The small model decodes every token. When the rolling mean of its predictive entropy (in nats,
of softmax(logits) at temperature 1, over the last `window` tokens, the current one included)
exceeds `threshold`, the token is drawn from the large model instead, as in entropy-gated model
cascades and mixed-model decoding (e.g. "Big Little Decoder", Kim et al. 2023, which hands over on
low small-model confidence). The output is a heuristic mixture, not either model's distribution;
what it reports is how much of the text the large model made (`large_fraction`).

The large model is called only when some row needs it, or to keep its cache in step: a call
feeds the last `sync_every` tokens of every row (rewriting slots it already holds), so its cache
may lag by up to `sync_every` tokens; when the lag reaches that, a catch-up call is made. Large
calls therefore stay near (large tokens + generated / sync_every) instead of one per token. The
skip is a `lax.cond` on one decision for the batch: under `jax.vmap` over keys (e.g.
`samplers.repeated`) each sample decides alone, the cond becomes a select that runs the large
model at every step, and `large_calls` then counts every step's call, what ran
(`samplers.core.cond_calls`).

Guarantees (tested): threshold = -1 (always large) gives exactly the large model's AR samples and
threshold = +inf (never) exactly the small model's, with the same key (`ar.sample` randomness:
the token at absolute position t of a row uses fold_in(row_key, t)).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from samplers.core import cond_calls, emit, rng
from samplers.core.logits import SamplingParams, sample_token
from samplers.core.protocol import (CausalModel, SampleOutput, check_max_new_tokens,
                               check_vocabularies, last_prompt_logits, prefill)
from samplers.spec import SamplerSpec


@dataclasses.dataclass(frozen=True)
class EntropySwitchConfig:
  """Attributes:
    max_new_tokens: N, tokens generated per row at most.
    threshold: rolling small-model entropy (nats) above which the large model draws the token.
    window: tokens in the rolling mean (>= 1).
    sync_every: W >= 1, the most tokens the large model's cache may lag (its call width).
    sampling, eos_id, pad_id: as in `ar.ARConfig`; the same processing for both models.
  """

  max_new_tokens: int
  threshold: float = 1.0
  window: int = 4
  sync_every: int = 8
  sampling: SamplingParams = SamplingParams()
  eos_id: int | None = None
  pad_id: int = 0

  def __post_init__(self):
    check_max_new_tokens(self.max_new_tokens)
    if self.window < 1:
      raise ValueError(f"window must be >= 1, got {self.window}")
    if self.sync_every < 1:
      raise ValueError(f"sync_every must be >= 1, got {self.sync_every}")


def entropy(logits: jax.Array) -> jax.Array:
  """Entropy in nats [...] of softmax(logits [..., V]) in float32."""
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.sum(jnp.where(jnp.isfinite(log_p), jnp.exp(log_p) * log_p, 0.0), axis=-1)


@functools.partial(jax.jit, static_argnames=("small", "large", "config"))
def sample(small: CausalModel, small_params, large: CausalModel, large_params,
           prompt: jax.Array, prompt_lengths: jax.Array, key: jax.Array,
           config: EntropySwitchConfig) -> SampleOutput:
  """Generates up to N tokens per row, switching to `large` where the small model is unsure.

  Args:
    small, large: hashable `CausalModel`s with the same vocabulary (static).
    small_params, large_params: their parameters.
    prompt: [B, P] int32 right-padded prompts; prompt_lengths: [B] int32, each in [1, P].
    key: one key or one per row (as `ar.sample`).
    config: static `EntropySwitchConfig`.
  Returns:
    SampleOutput with tokens [B, N]; stats `model_calls` (= `large_calls`, the large model's
    calls that ran, prefill included: under a `jax.vmap` that batches the call decision, one per
    step), `small_calls`, `large_calls`, `large_tokens`, `generated_tokens` and `large_fraction`
    (float32 large_tokens / generated_tokens).
  Raises:
    ValueError: vocabularies differ, or P + N + sync_every exceeds either model's max_len.
  """
  check_vocabularies(small, large, ("small model", "large model"))
  batch, prompt_len = prompt.shape
  steps, width = config.max_new_tokens, config.sync_every
  slots = prompt_len + steps + width
  for name, model in (("small model", small), ("large model", large)):
    if slots > model.max_len:
      raise ValueError(f"prompt length {prompt_len} + max_new_tokens {steps} + sync_every {width} "
                       f"= {slots} exceeds the {name}'s max_len {model.max_len}")
  keys = rng.row_keys(key, batch)
  prompt_lengths = prompt_lengths.astype(jnp.int32)
  rows = jnp.arange(batch)

  small_logits, small_cache = prefill(small, small_params, prompt, small.init_cache(batch, slots))
  small_last = last_prompt_logits(small_logits, prompt_lengths)
  _, large_cache = prefill(large, large_params, prompt, large.init_cache(batch, slots))
  seq = jnp.zeros((batch, slots), jnp.int32).at[:, :prompt_len].set(prompt)

  def large_call(seq, cache, context):
    """The large model's logits after each row's last token, feeding the W tokens before it."""
    start = jnp.maximum(context - width, 0)
    window = start[:, None] + jnp.arange(width)[None, :]
    logits, cache = large.apply(large_params, jnp.take_along_axis(seq, window, axis=1), window,
                                cache.replace(lengths=start))
    last = jnp.take_along_axis(logits, (context - 1 - start)[:, None, None], axis=1)[:, 0]
    return last, cache.replace(lengths=context)

  def body(s):
    context = prompt_lengths + s["n"]
    active = ~s["done"]
    history = s["entropies"].at[:, s["step"] % config.window].set(entropy(s["small_logits"]))
    seen = jnp.minimum(s["step"] + 1, config.window)
    rolling = jnp.sum(history, axis=1) / seen
    use_large = (rolling > config.threshold) & active
    lagging = jnp.any(active & (context - s["filled"] >= width))
    call = jnp.any(use_large) | lagging
    ran = cond_calls.branch_ran(call)  # True at every step under a vmap that batches `call`
    large_logits, large_cache = jax.lax.cond(
        call, large_call, lambda seq, cache, context: (jnp.zeros_like(s["small_logits"]), cache),
        s["seq"], s["large_cache"], context)
    logits = jnp.where(use_large[:, None], large_logits, s["small_logits"])
    token = jax.vmap(sample_token, in_axes=(0, 0, None))(
        rng.position_keys(keys, context), logits, config.sampling)
    token, done, n = emit.token(token, s["done"], s["n"], config.eos_id, config.pad_id)
    done |= n >= steps
    seq = s["seq"].at[rows, context].set(jnp.where(active, token, s["seq"][rows, context]))
    small_logits, small_cache = small.apply(small_params, token[:, None], context[:, None],
                                            s["small_cache"].replace(lengths=context))
    return dict(step=s["step"] + 1, seq=seq, n=n, done=done, small_logits=small_logits[:, 0],
                small_cache=small_cache, large_cache=large_cache,
                filled=jnp.where(call, context, s["filled"]), entropies=history,
                large_calls=s["large_calls"] + ran.astype(jnp.int32),
                large_tokens=s["large_tokens"] + jnp.sum(use_large, dtype=jnp.int32))

  state = dict(step=jnp.int32(0), seq=seq, n=jnp.zeros((batch,), jnp.int32),
               done=jnp.zeros((batch,), bool), small_logits=small_last, small_cache=small_cache,
               large_cache=large_cache.replace(lengths=prompt_lengths), filled=prompt_lengths,
               entropies=jnp.zeros((batch, config.window), jnp.float32),
               large_calls=jnp.int32(1), large_tokens=jnp.int32(0))
  s = jax.lax.while_loop(lambda s: ~jnp.all(s["done"]), body, state)
  tokens = emit.generated(s["seq"], prompt_lengths, s["n"], steps, config.pad_id)
  total = jnp.sum(s["n"])
  stats = {"model_calls": s["large_calls"], "large_calls": s["large_calls"],
           "small_calls": 1 + s["step"], "large_tokens": s["large_tokens"], "generated_tokens": total,
           "large_fraction": s["large_tokens"] / jnp.maximum(total, 1).astype(jnp.float32)}
  return SampleOutput(tokens=tokens, lengths=s["n"], stats=stats)


@dataclasses.dataclass(frozen=True)
class EntropySwitchOptions:
  """`sampler.*` settings of kind "entropy_switch" (the second model, small, decodes; this large
  model takes over where the small one is unsure).

  Attributes:
    threshold: rolling-entropy threshold in nats.
    window: >= 1, positions in the rolling entropy.
    sync_every: >= 1, the most tokens the large model's cache may lag.
  """

  threshold: float = 1.0
  window: int = 4
  sync_every: int = 8


SPEC = SamplerSpec(
    "entropy_switch", EntropySwitchOptions, sample,
    lambda o, decode: EntropySwitchConfig(threshold=o.threshold, window=o.window,
                                          sync_every=o.sync_every, **decode.common()),
    second_model="small", second_first=True, slack=lambda o: o.sync_every)

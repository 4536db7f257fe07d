"""Logit processing shared by every sampler: temperature, top-k, top-p, greedy.

Speculative samplers must apply exactly the same transform to the target and the draft, so the
processed distribution is exposed (`process_logits`, `probs`) besides `sample_token`. Everything
is computed in float32, whatever the logits' dtype.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How a token is drawn from logits.

  Attributes:
    temperature: logits are divided by it; 0 means greedy (argmax).
    top_k: keep the k largest logits; 0 disables.
    top_p: nucleus: keep the smallest set of most likely tokens whose mass is >= top_p (after
      temperature and top-k); 1.0 disables. The most likely token is always kept.

  Tokens tied with the last kept logit are kept too, so top-k may keep more than k on exact ties.
  """

  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"sampling.temperature must be >= 0 (0 = greedy), got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"sampling.top_k must be >= 0 (0 = off), got {self.top_k}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"sampling.top_p must be in (0, 1] (1 = off), got {self.top_p}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
  """Sets all but the k largest of logits [..., V] to -inf (ties with the k-th are kept)."""
  k = min(k, logits.shape[-1])
  kth = jax.lax.top_k(logits, k)[0][..., -1:]
  return jnp.where(logits >= kth, logits, -jnp.inf)


def top_p_filter(logits: jax.Array, p: float) -> jax.Array:
  """Keeps the smallest most-likely set of logits [..., V] with softmax mass >= p; rest -inf."""
  ordered = -jnp.sort(-logits, axis=-1)
  mass = jax.nn.softmax(ordered, axis=-1)
  mass_before = jnp.cumsum(mass, axis=-1) - mass  # exactly 0 for the top token
  keep = jnp.sum(mass_before < p, axis=-1, keepdims=True)
  threshold = jnp.take_along_axis(ordered, keep - 1, axis=-1)
  return jnp.where(logits >= threshold, logits, -jnp.inf)


def process_logits(logits: jax.Array, params: SamplingParams) -> jax.Array:
  """logits [..., V] -> float32 [..., V] whose softmax is the sampling distribution.

  Greedy keeps only the (first) argmax, so `probs` is then one-hot.
  """
  logits = logits.astype(jnp.float32)
  if params.greedy:
    top = jnp.argmax(logits, axis=-1)[..., None]
    return jnp.where(jnp.arange(logits.shape[-1]) == top, logits, -jnp.inf)
  logits = logits / params.temperature
  if params.top_k:
    logits = top_k_filter(logits, params.top_k)
  if params.top_p < 1:
    logits = top_p_filter(logits, params.top_p)
  return logits


def probs(logits: jax.Array, params: SamplingParams) -> jax.Array:
  """The sampling distribution [..., V] float32 for logits [..., V]."""
  return jax.nn.softmax(process_logits(logits, params), axis=-1)


def sample_token(key: jax.Array, logits: jax.Array, params: SamplingParams) -> jax.Array:
  """Draws token ids [...] int32 from logits [..., V] with one key; float32 Gumbel noise."""
  if params.greedy:
    return jnp.argmax(logits.astype(jnp.float32), axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, process_logits(logits, params), axis=-1).astype(jnp.int32)


def confidence(logits: jax.Array) -> jax.Array:
  """[..., V] -> [...] the raw max probability (whatever the sampling settings): a drafter's
  confidence in its top token, which adaptive draft lengths stop on."""
  return jnp.max(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), axis=-1)

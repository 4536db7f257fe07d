"""Masking schedules of masked diffusion (MDLM, Sahoo et al. 2024) and their ELBO weights.

At time t in (0, 1] each token is independently kept with probability alpha_t and replaced by the
mask token otherwise (alpha_0 = 1, alpha_1 = 0). The continuous-time ELBO weighs the masked tokens'
cross-entropy by w(t) = -alpha'_t / (1 - alpha_t):

- "loglinear": alpha_t = 1 - t, w(t) = 1 / t.
- "cosine": alpha_t = cos(pi t / 2), w(t) = (pi / 2) cot(pi t / 4), written so that it stays
  finite in float32 for tiny t (1 - cos underflows; 2 sin^2(pi t / 4) does not).

Both give the same expected bound (substituting a = alpha_t, a pattern of m masked tokens out of L
gets total weight B(m, L - m + 1) whatever the schedule); they differ in its variance.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

SCHEDULES = ("loglinear", "cosine")


def _check(schedule: str) -> None:
  if schedule not in SCHEDULES:
    raise ValueError(f"diffusion schedule {schedule!r} is unknown; valid: {', '.join(SCHEDULES)}")


def alpha(schedule: str, t: jax.Array) -> jax.Array:
  """alpha_t, the probability that a token is still unmasked at time t (any shape, float32)."""
  _check(schedule)
  if schedule == "loglinear":
    return 1.0 - t
  return jnp.cos(0.5 * math.pi * t)


def mask_probability(schedule: str, t: jax.Array) -> jax.Array:
  """1 - alpha_t, computed without cancellation."""
  _check(schedule)
  if schedule == "loglinear":
    return t
  return 2.0 * jnp.square(jnp.sin(0.25 * math.pi * t))


def loss_weight(schedule: str, t: jax.Array) -> jax.Array:
  """w(t) = -alpha'_t / (1 - alpha_t) > 0 for t in (0, 1]."""
  _check(schedule)
  if schedule == "loglinear":
    return 1.0 / t
  quarter = 0.25 * math.pi * t
  return 0.5 * math.pi * jnp.cos(quarter) / jnp.sin(quarter)


def stratified_times(key: jax.Array, shape: tuple[int, ...],
                     floor: float | jax.Array = 0.0) -> jax.Array:
  """Low-discrepancy times in (floor, 1]: one uniform offset u, t_k = 1 - ((u + k / n) mod 1) over
  the n = prod(shape) entries, mapped to floor + (1 - floor) t. Each entry is marginally uniform
  (so the ELBO estimate stays unbiased for floor 0) and the batch covers (0, 1] evenly, which
  lowers the variance of the loss (MDLM's antithetic sampling). `floor`: a float, or an array
  that broadcasts to `shape` (per-row floors)."""
  count = math.prod(shape)
  u = jax.random.uniform(key, (), jnp.float32)
  t = 1.0 - jnp.mod(u + jnp.arange(count, dtype=jnp.float32) / count, 1.0)
  return floor + (1.0 - floor) * t.reshape(shape)

"""The optimal acceptance of k i.i.d. drafts at one position (Hu et al. 2025, "Towards Optimal
Multi-draft Speculative Decoding"; Sun et al. 2023 cast it as optimal transport).

The best acceptance probability any exact verifier can reach, with the emitted token ~ p and k
drafts i.i.d. ~ q, is a max-flow between y ~ p and draft tuples ~ q^k (edge when y is in the
tuple); by max-flow/min-cut (Sun et al. 2023, SpecTr)

  alpha*(p, q, k) = min over H subset of V of [1 - p(H) + 1 - (1 - q(H))^k].

k = 1 gives 1 - TV(p, q). Guarantee: no exact verifier accepts more often; verifiers are compared
against it (k-sequential selection lies between single-draft acceptance and alpha*).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Largest vocabulary searched over all 2^V subsets.
BRUTE_FORCE_MAX_VOCAB = 16


def _cut(p_h: jax.Array, q_h: jax.Array, k: int) -> jax.Array:
  """The objective 1 - p(H) + 1 - (1 - q(H))^k for masses p_h, q_h of subsets H."""
  return 2.0 - p_h - (1.0 - q_h) ** k


def brute_force(p: jax.Array, q: jax.Array, k: int) -> jax.Array:
  """alpha* [] by minimising over all 2^V subsets; p, q [V] with V <= BRUTE_FORCE_MAX_VOCAB."""
  vocab = p.shape[-1]
  if vocab > BRUTE_FORCE_MAX_VOCAB:
    raise ValueError(
        f"brute force over subsets is for vocab <= {BRUTE_FORCE_MAX_VOCAB}, got {vocab}")
  subsets = (jnp.arange(2 ** vocab)[:, None] >> jnp.arange(vocab)[None, :]) & 1  # [2^V, V]
  subsets = subsets.astype(p.dtype)
  return jnp.min(_cut(subsets @ p, subsets @ q, k))


def sorted_prefix(p: jax.Array, q: jax.Array, k: int) -> jax.Array:
  """alpha* [] by minimising over the V + 1 prefixes of the tokens sorted by p/q, descending.

  Exact: with g(s) = (1 - s)^k convex, an optimal H can lose no member x and gain no outsider y,
  which forces p(x)/q(x) >= -g'(q(H)) >= p(y)/q(y); among tokens of equal ratio the objective is
  concave in how many are taken, so all or none are. Hence some prefix is optimal (a derivation,
  checked against `brute_force` in the tests).
  """
  ratio = jnp.where(q > 0, p / jnp.where(q > 0, q, 1.0), jnp.where(p > 0, jnp.inf, 0.0))
  order = jnp.argsort(-ratio)
  zero = jnp.zeros((1,), p.dtype)
  p_h = jnp.concatenate([zero, jnp.cumsum(p[order])])
  q_h = jnp.concatenate([zero, jnp.cumsum(q[order])])
  return jnp.min(_cut(p_h, q_h, k))


def optimal_acceptance(p: jax.Array, q: jax.Array, k: int) -> jax.Array:
  """alpha*(p, q, k) [] for target p [V], draft q [V] and k >= 1 i.i.d. drafts (static int).

  Brute force over subsets for V <= BRUTE_FORCE_MAX_VOCAB, else the sorted-prefix search.
  """
  if k < 1:
    raise ValueError(f"k (number of drafts) must be >= 1, got {k}")
  if p.shape[-1] <= BRUTE_FORCE_MAX_VOCAB:
    return brute_force(p, q, k)
  return sorted_prefix(p, q, k)

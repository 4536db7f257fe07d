"""Per-position verification rules of draft-then-verify samplers, as small pure functions.

A rule sees one position of one row: the target's sampling distribution p [V], the distribution
the proposals were drawn from, the proposed tokens and uniforms. It returns which proposal was
accepted (or that none was) and the emitted token. Guarantee (the papers cited per rule): the emitted token
is distributed exactly as p, provided the proposals were drawn as the rule assumes. Sequence-level
samplers scan a rule over positions and vmap it over rows; token-tree samplers apply it per node.

Randomness comes in as uniforms in (0, 1) (`uniforms`), not keys: a sampler draws all of a
position's uniforms in one call, since every separate random draw site costs XLA:CPU a second or
more of compile time. A rule over K proposals takes K acceptance uniforms followed by V more for
its Gumbel-max emission. Probabilities are float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Bisection steps for the SpecTr division factor: the interval [1, k] shrinks below float32
# resolution after ~24 halvings for the small k used in practice.
_BISECTION_STEPS = 32


def uniforms(key: jax.Array, shape) -> jax.Array:
  """float32 uniforms in (0, 1) of the given shape, the randomness every rule consumes."""
  return jax.random.uniform(key, shape, jnp.float32, minval=jnp.finfo(jnp.float32).tiny)


def draw(u: jax.Array, dist: jax.Array) -> jax.Array:
  """A token id ([] int32) ~ probabilities dist [V] by Gumbel-max with uniforms u [V]; zeros in
  dist are never drawn."""
  return jnp.argmax(jnp.log(dist) - jnp.log(-jnp.log(u))).astype(jnp.int32)


def _normalise(mass: jax.Array, fallback: jax.Array) -> jax.Array:
  """mass [V] / its sum, or `fallback` [V] where the mass is all zero."""
  total = jnp.sum(mass)
  return jnp.where(total > 0, mass / jnp.where(total > 0, total, 1.0), fallback)


def residual(p: jax.Array, q: jax.Array) -> jax.Array:
  """norm(max(0, p - q)) [V]: what to emit after rejecting a draft drawn from q [V].

  Leviathan et al. 2023, Chen et al. 2023. Where p <= q everywhere (so p == q) a rejection has
  probability 0 and p itself is returned.
  """
  return _normalise(jnp.maximum(p - q, 0.0), p)


def single_draft(u: jax.Array, p: jax.Array, q: jax.Array,
                 draft: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Speculative sampling at one position (Leviathan et al. 2023; Chen et al. 2023).

  Accepts `draft` ([] int32, drawn from q [V]) with probability min(1, p(draft) / q(draft));
  otherwise emits a token from `residual(p, q)`. The emitted token is exactly ~ p. With one-hot p
  and q (greedy) it accepts iff draft == argmax p and otherwise emits argmax p.

  Args:
    u: [1 + V] uniforms.
  Returns:
    (accepted [] bool, token [] int32).
  """
  accepted = u[0] * q[draft] < p[draft]
  return accepted, jnp.where(accepted, draft, draw(u[1:], residual(p, q)))


def greedy_chain(drafts: jax.Array, target_logits: jax.Array,
                 lengths: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Greedy verification of a chain of drafts in closed form (every row at once).

  With one-hot p and q, `single_draft` accepts draft i iff it is the target's argmax there, and
  otherwise emits that argmax; the bonus token is the argmax after the last draft. So the tokens
  a row emits are the target's argmaxes themselves, and only the count of leading matches needs
  computing: no probabilities, no uniforms.

  Args:
    drafts: [B, G] int32 proposed tokens.
    target_logits: [B, G + 1, V] the target's logits after the context's last token and after
      each draft.
    lengths: [B] int32 in [0, G], drafts each row proposed (None: all G).
  Returns:
    (emitted [B, G + 1] int32, accepted [B] int32): row b emits emitted[b, :accepted[b] + 1],
    exactly what `single_draft` emits with one-hot p and q.
  """
  top = jnp.argmax(target_logits.astype(jnp.float32), axis=-1).astype(jnp.int32)
  match = drafts == top[:, :-1]
  if lengths is not None:
    match &= jnp.arange(drafts.shape[1])[None, :] < lengths[:, None]
  return top, jnp.sum(jnp.cumprod(match, axis=1), axis=1, dtype=jnp.int32)


def _geometric(ratio: jax.Array, count: jax.Array, max_count: int) -> jax.Array:
  """sum_{i < count} ratio^i = (1 - ratio^count) / (1 - ratio), without the 0/0 at ratio 1."""
  powers = ratio ** jnp.arange(max_count, dtype=jnp.float32)
  return jnp.sum(jnp.where(jnp.arange(max_count) < count, powers, 0.0))


def division_factor(p: jax.Array, q: jax.Array, k, max_k: int | None = None) -> jax.Array:
  """SpecTr's division factor rho ([] float32) for k i.i.d. candidates (Sun et al. 2023).

  With beta(rho) = sum_x min(q(x), p(x) / rho), the k-sequential residual is non-negative iff
  rho >= (1 - (1 - beta)^k) / beta (Sun et al. 2023). rho = k always satisfies it; this returns 1
  when 1 does, else the feasible end of a bisection on [1, k] (to float32 resolution), so the
  result is always feasible up to rounding (which `k_sequential_residual` clips).

  Args:
    p, q: [V] target and draft distributions.
    k: number of candidates, a Python int or a traced [] int32 >= 1.
    max_k: static upper bound on k (default: k, which must then be a Python int).
  """
  max_k = k if max_k is None else max_k
  k = jnp.maximum(k, 1)

  def feasible(rho):
    beta = jnp.sum(jnp.minimum(q, p / rho))
    return rho >= _geometric(1.0 - beta, k, max_k)

  def halve(_, interval):
    low, high = interval
    middle = 0.5 * (low + high)
    ok = feasible(middle)
    return jnp.where(ok, low, middle), jnp.where(ok, middle, high)

  one = jnp.float32(1.0)
  _, high = jax.lax.fori_loop(0, _BISECTION_STEPS, halve, (one, k.astype(jnp.float32)))
  return jnp.where(feasible(one), one, high)


def k_sequential_residual(p: jax.Array, q: jax.Array, rho: jax.Array, k,
                          max_k: int) -> jax.Array:
  """p_res [V] of k-sequential selection: norm((p - min(q, p/rho) (1 - (1-beta)^k) / beta)^+)."""
  accept = jnp.minimum(q, p / rho)
  scale = _geometric(1.0 - jnp.sum(accept), jnp.maximum(k, 1), max_k)
  return _normalise(jnp.maximum(p - accept * scale, 0.0), p)


def k_sequential(u: jax.Array, p: jax.Array, q: jax.Array, drafts: jax.Array,
                 active: jax.Array) -> tuple[jax.Array, jax.Array]:
  """SpecTr k-sequential selection at one position (Sun et al. 2023).

  The k = sum(active) active drafts must be i.i.d. ~ q [V]. They are tried in index order, each
  accepted with probability min(1, p(x) / (rho q(x))) with rho = `division_factor(p, q, k)`; if
  all are rejected a token is drawn from `k_sequential_residual`. The emitted token is exactly
  ~ p; with k = 1 this is `single_draft`.

  Args:
    u: [K + V] uniforms.
    drafts: [K] int32 proposed tokens; active: [K] bool which of them take part.
  Returns:
    (index [] int32 of the accepted draft or -1, token [] int32).
  """
  max_k = drafts.shape[0]
  count = jnp.sum(active)
  rho = division_factor(p, q, count, max_k)
  accepted = active & (u[:max_k] * rho * q[drafts] < p[drafts])
  index = jnp.where(jnp.any(accepted), jnp.argmax(accepted), -1).astype(jnp.int32)
  fallback = draw(u[max_k:], k_sequential_residual(p, q, rho, count, max_k))
  return index, jnp.where(index >= 0, drafts[index], fallback)


def without_replacement(q: jax.Array, children: jax.Array, active: jax.Array) -> jax.Array:
  """qs [K, V]: the distribution each child was drawn from when the active children [K] were
  drawn one after another from q [V] without replacement: q with the earlier active children
  removed, renormalised."""
  taken = jax.nn.one_hot(children, q.shape[-1], dtype=q.dtype) * active[:, None]  # [K, V]
  earlier = jnp.cumsum(taken, axis=0) - taken
  return jax.vmap(_normalise, in_axes=(0, None))(q * (1.0 - earlier), q)


def recursive_rejection(u: jax.Array, p: jax.Array, qs: jax.Array, children: jax.Array,
                        active: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Recursive rejection sampling over siblings (SpecInfer, Miao et al. 2024; EAGLE).

  For each active child j in index order: accept it with probability
  min(1, p_cur(c_j) / q_j(c_j)), else p_cur <- `residual(p_cur, q_j)`; if all are rejected a
  token is drawn from p_cur (initially p [V]). q_j = qs[j] must be the distribution c_j was drawn
  from given the earlier siblings: q for i.i.d. children, `without_replacement(q, ...)` for
  sampling without replacement, one-hot for deterministic children. The token is exactly ~ p.

  Args:
    u: [K + V] uniforms.
    qs: [K, V]; children: [K] int32; active: [K] bool.
  Returns:
    (index [] int32 of the accepted child or -1, token [] int32).
  """
  count = children.shape[0]

  def try_child(carry, child):
    p_cur, index = carry
    j, token, q_j, u_j, live = child
    tried = live & (index < 0)
    accepted = tried & (u_j * q_j[token] < p_cur[token])
    p_cur = jnp.where(tried & ~accepted, residual(p_cur, q_j), p_cur)
    return (p_cur, jnp.where(accepted, j, index)), None

  order = jnp.arange(count, dtype=jnp.int32)
  (p_cur, index), _ = jax.lax.scan(try_child, (p, jnp.int32(-1)),
                                   (order, children, qs, u[:count], active))
  return index, jnp.where(index >= 0, children[index], draw(u[count:], p_cur))

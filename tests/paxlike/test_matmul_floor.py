"""The matmul floor finds every product of a step (forward, backward, custom VJPs, loops) and
runs exactly those, bare."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paxlike.bench import matmul_floor

M, K, N = 6, 5, 3


def _mm_flops(m, k, n):
  return 2 * m * k * n


def test_a_gradient_step_has_its_forward_and_both_backward_products():
  loss = lambda w, x: jnp.sum(jnp.tanh(x @ w))
  dots = matmul_floor.step_dots(jax.grad(loss, argnums=(0, 1)), jnp.ones((K, N)),
                                jnp.ones((M, K)))
  assert len(dots) == 3
  assert sum(d.flops for d in dots) == 3 * _mm_flops(M, K, N)
  # with respect to w only, autodiff computes no product for dx
  only_w = matmul_floor.step_dots(jax.grad(loss), jnp.ones((K, N)), jnp.ones((M, K)))
  assert len(only_w) == 2


def test_batched_products_count_their_batch():
  f = lambda a, b: jnp.einsum("bik,bkj->bij", a, b)
  (dot,) = matmul_floor.step_dots(f, jnp.ones((4, M, K)), jnp.ones((4, K, N)))
  assert dot.flops == 4 * _mm_flops(M, K, N)


def test_nested_calls_custom_vjps_scans_and_conditionals_are_walked():
  @jax.custom_vjp
  def project(x, w):
    return x @ w

  project.defvjp(lambda x, w: (x @ w, (x, w)), lambda res, g: (g @ res[1].T, res[0].T @ g))

  def step(x, w):
    inner = jax.jit(lambda x: project(x, w))(x)  # a nested jit, a custom VJP
    def body(carry, _):
      return carry @ jnp.eye(N), None  # 3 trips of an [M, N] x [N, N] product
    carry, _ = jax.lax.scan(body, inner, None, length=3)
    cheap = lambda c: c
    dear = lambda c: c @ jnp.eye(N) @ jnp.eye(N)  # the costlier branch: two products
    return jnp.sum(jax.lax.cond(jnp.sum(carry) > 0, dear, cheap, carry))

  dots = matmul_floor.step_dots(jax.grad(step, argnums=1), jnp.ones((M, K)), jnp.ones((K, N)))
  flops = sum(d.flops for d in dots)
  forward = _mm_flops(M, K, N) + 3 * _mm_flops(M, N, N) + 2 * _mm_flops(M, N, N)
  # backward: the custom VJP's two products, the scan's (dcarry per trip), the branch's (two)
  assert flops >= forward + 2 * _mm_flops(M, K, N)
  assert any(d.trips == 3 for d in dots)
  # a broken walk that skips sub-programs would miss the jit, scan and cond bodies
  assert len(dots) >= 8


def test_a_while_loop_is_refused_by_name():
  def loop(x):
    return jax.lax.while_loop(lambda c: jnp.sum(c) < 10, lambda c: c @ jnp.eye(2) + 1, x)
  with pytest.raises(ValueError, match="while loop"):
    matmul_floor.step_dots(loop, jnp.ones((2, 2)))


def test_the_bare_program_runs_each_product_on_its_own_operands():
  # two layers of the same shapes: each product must run (not merged by XLA)
  def two_layers(x, w1, w2):
    return jnp.sum((x @ w1) @ w2)
  dots = matmul_floor.step_dots(two_layers, jnp.ones((M, K)), jnp.ones((K, K)),
                                jnp.ones((K, K)))
  dots = dots + dots  # the same specs twice over
  outputs = matmul_floor.bare_program(dots)()
  assert [o.shape for o in outputs] == [(M, K)] * 4
  # each product has its own smaller operand, so equal-shaped products differ
  assert not np.allclose(outputs[0], outputs[2])
  assert not np.allclose(outputs[1], outputs[3])

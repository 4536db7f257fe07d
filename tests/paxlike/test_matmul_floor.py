"""The matmul floor finds every product of a step (forward, backward, custom VJPs, remat, loops,
conditionals) exactly once and runs exactly those, bare."""

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


def test_nested_calls_custom_vjps_scans_and_conditionals_are_walked_once_each():
  @jax.custom_vjp
  def project(x, w):
    return x @ w

  project.defvjp(lambda x, w: (x @ w, (x, w)), lambda res, g: (g @ res[1].T, res[0].T @ g))

  def step(x, w):
    inner = jax.jit(lambda x: project(x, w))(x)  # a nested jit, a custom VJP
    def body(carry, _):
      return carry @ jnp.eye(N), None  # 3 trips of an [M, N] x [N, N] product
    carry, _ = jax.lax.scan(body, inner, None, length=3)
    cheap = lambda c: c @ jnp.eye(N)  # one product
    dear = lambda c: c @ jnp.eye(N) @ jnp.eye(N)  # the costlier branch: two
    return jnp.sum(jax.lax.cond(jnp.sum(carry) > 0, dear, cheap, carry))

  dots = matmul_floor.step_dots(jax.grad(step, argnums=1), jnp.ones((M, K)), jnp.ones((K, N)))
  square = _mm_flops(M, N, N)
  # forward: project, 3 scan trips, the dear branch (2); backward: the custom VJP's two, the
  # scan's 3 trips, the dear branch's 2 (neither the cheap branch nor a repeat counted)
  assert sum(d.flops for d in dots) == 3 * _mm_flops(M, K, N) + 6 * square + 4 * square
  assert len(dots) == 9 and sorted(d.trips for d in dots) == [1] * 7 + [3, 3]


def test_rematerialised_products_count_as_often_as_they_run():
  layer = lambda x, w: jnp.tanh(x @ w) @ w.T
  x, w = jnp.ones((M, K)), jnp.ones((K, K))
  plain = matmul_floor.step_dots(jax.grad(lambda w: jnp.sum(layer(x, w))), w)
  remat = matmul_floor.step_dots(jax.grad(lambda w: jnp.sum(jax.checkpoint(layer)(x, w))), w)
  assert len(remat) > len(plain)  # the backward pass recomputes the forward's products


def test_the_walk_matches_xlas_count_on_a_matmul_bound_step():
  def loss(ws, x):
    for w in ws:
      x = jax.nn.relu(x @ w)
    return jnp.sum(x)
  ws, x = [jnp.ones((256, 256)) for _ in range(3)], jnp.ones((128, 256))
  step = jax.grad(loss)
  walked = sum(d.flops for d in matmul_floor.step_dots(step, ws, x))
  xla = jax.jit(step).lower(ws, x).compile().cost_analysis()["flops"]
  assert walked <= xla <= 1.05 * walked  # XLA counts the elementwise work too


def test_a_while_loop_is_refused_by_name():
  def loop(x):
    return jax.lax.while_loop(lambda c: jnp.sum(c) < 10, lambda c: c @ jnp.eye(2) + 1, x)
  with pytest.raises(ValueError, match="while loop"):
    matmul_floor.step_dots(loop, jnp.ones((2, 2)))


def test_the_bare_program_runs_each_product_as_its_own_dot():
  # two layers of the same shapes, twice over: four products XLA must not merge
  def two_layers(x, w1, w2):
    return jnp.sum((x @ w1) @ w2)
  dots = matmul_floor.step_dots(two_layers, jnp.ones((M, K)), jnp.ones((K, K)),
                                jnp.ones((K, K)))
  dots = dots + dots
  products, operands = matmul_floor.bare_products(dots)
  hlo = products.lower(operands).compile().as_text()
  assert hlo.count(" dot(") == 4
  outputs = matmul_floor.bare_program(dots)()
  assert [o.shape for o in outputs] == [(M, K)] * 4
  assert not np.allclose(outputs[0], outputs[2])  # each product has its own smaller operand

"""The hand-written backward passes (`models.dense_attention`, `models.fused`) against autodiff of
the plain expressions they replace: values and gradients, with a broken backward caught."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import attention, dense_attention, fused


def _normal(rng, *shape):
  return jnp.asarray(rng.normal(size=shape), jnp.float32)


def _value_and_grads(fn, inputs, weight):
  """Value and gradients of sum(fn(*inputs) * weight): a random cotangent, not all ones."""
  loss = lambda *args: jnp.sum(fn(*args).astype(jnp.float32) * weight)
  return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(inputs)))))(*inputs)


def _assert_close(got, want, atol):
  (got_value, got_grads), (want_value, want_grads) = got, want
  np.testing.assert_allclose(got_value, want_value, rtol=1e-5, atol=atol)
  for g, w in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, w, atol=atol)


def _qkv(rng, batch, steps, heads, kv_heads, dim):
  return (_normal(rng, batch, steps, heads, dim), _normal(rng, batch, steps, kv_heads, dim),
          _normal(rng, batch, steps, kv_heads, dim), _normal(rng, batch, steps, heads, dim))


@pytest.mark.parametrize("steps", [5, 64, 200])  # one block; four blocks, the last one short
def test_causal_equals_masked_attend(steps):
  rng = np.random.default_rng(steps)
  q, k, v, weight = _qkv(rng, 2, steps, 6, 2, 8)
  causal_mask = jnp.tril(jnp.ones((1, steps, steps), bool))
  want = _value_and_grads(lambda q, k, v: attention.attend(q, k, v, causal_mask), (q, k, v),
                          weight)
  _assert_close(_value_and_grads(dense_attention.causal, (q, k, v), weight), want, 2e-5)
  # Through `causal_attention`, the models' entry point.
  got = _value_and_grads(lambda q, k, v: attention.causal_attention(q, k, v, "dense"), (q, k, v),
                         weight)
  _assert_close(got, want, 2e-5)


def test_block_bounds_cover_the_sequence_in_order():
  assert dense_attention.block_bounds(50) == [(0, 50)]
  bounds = dense_attention.block_bounds(1000)
  assert bounds[0][0] == 0 and bounds[-1][1] == 1000 and len(bounds) == 8
  assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))


def test_masked_attend_equals_attend_with_fully_masked_rows():
  """Any mask, per row of the batch, including rows that see nothing (uniform, as in `attend`)."""
  rng = np.random.default_rng(1)
  q, k, v, weight = _qkv(rng, 3, 9, 4, 4, 8)
  mask = jnp.asarray(rng.random((3, 9, 9)) < 0.4).at[1, 2].set(False)
  want = _value_and_grads(lambda q, k, v: attention.attend(q, k, v, mask), (q, k, v), weight)
  got = _value_and_grads(lambda q, k, v: dense_attention.attend(q, k, v, mask), (q, k, v), weight)
  _assert_close(got, want, 2e-5)


def test_bfloat16_attention_matches_the_reference_in_bfloat16():
  rng = np.random.default_rng(2)
  q, k, v, weight = _qkv(rng, 2, 70, 4, 2, 16)
  q, k, v = (a.astype(jnp.bfloat16) for a in (q, k, v))
  causal_mask = jnp.tril(jnp.ones((1, 70, 70), bool))
  want = _value_and_grads(lambda q, k, v: attention.attend(q, k, v, causal_mask), (q, k, v),
                          weight)
  got = _value_and_grads(dense_attention.causal, (q, k, v), weight)
  assert all(g.dtype == jnp.bfloat16 for g in got[1])
  _assert_close(jax.tree.map(lambda a: a.astype(jnp.float32), got),
                jax.tree.map(lambda a: a.astype(jnp.float32), want), 0.1)


def test_a_backward_without_the_row_term_is_caught(monkeypatch):
  """dS = P * dP (dropping rowsum(dO * O)) keeps the value and breaks the gradients."""
  rng = np.random.default_rng(3)
  q, k, v, weight = _qkv(rng, 1, 16, 2, 2, 8)
  causal_mask = jnp.tril(jnp.ones((1, 16, 16), bool))
  want = _value_and_grads(lambda q, k, v: attention.attend(q, k, v, causal_mask), (q, k, v),
                          weight)
  monkeypatch.setattr(dense_attention, "_row_term", lambda d_out, out: 0.0)
  got = _value_and_grads(dense_attention.causal, (q, k, v), weight)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  with pytest.raises(AssertionError):
    _assert_close(got, want, 1e-3)


def test_swiglu_equals_autodiff():
  rng = np.random.default_rng(4)
  gate, up, weight = (_normal(rng, 4, 7, 12) * 3 for _ in range(3))
  want = _value_and_grads(lambda g, u: jax.nn.silu(g) * u, (gate, up), weight)
  _assert_close(_value_and_grads(fused.swiglu, (gate, up), weight), want, 1e-5)


def test_rms_norm_equals_autodiff():
  rng = np.random.default_rng(5)
  x, weight = _normal(rng, 3, 5, 16) * 2, _normal(rng, 3, 5, 16)
  scale = 1.0 + 0.1 * _normal(rng, 16)

  def plain(x, scale):
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + 1e-6) * scale

  want = _value_and_grads(plain, (x, scale), weight)
  _assert_close(_value_and_grads(lambda x, s: fused.rms_norm(x, s, 1e-6), (x, scale), weight),
                want, 1e-5)

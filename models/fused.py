"""Elementwise layers with hand-written backward passes: SwiGLU's gate and RMSNorm.

Autodiff through `silu(gate) * up` and `x * rsqrt(mean(x^2) + eps) * scale` leaves XLA a chain
of elementwise passes over the [B, T, F] activations in the backward pass, plus the
forward's intermediates kept for it; XLA:CPU runs each as its own loop. Here each backward is one
fused expression of the saved inputs:

  SwiGLU  h = silu(g) * u:          dg = dh * u * s * (1 + g * (1 - s)),  du = dh * silu(g),
                                    s = sigmoid(g)
  RMSNorm y = x * r * w, r = rsqrt(mean(x^2) + eps):
                                    dx = r * (dy * w - x * r^2 * mean(dy * w * x)),
                                    dw = sum over rows of dy * x * r

Both compute in float32 and return the input's dtype, as the autodiff versions do in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.custom_vjp
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
  """silu(gate) * up; gate, up: [..., F] of one dtype -> [..., F] in that dtype."""
  g = gate.astype(jnp.float32)
  return (g * jax.nn.sigmoid(g) * up.astype(jnp.float32)).astype(gate.dtype)


def _swiglu_fwd(gate, up):
  return swiglu(gate, up), (gate, up)


def _swiglu_bwd(residuals, d_h):
  gate, up = residuals
  g, u, d = (a.astype(jnp.float32) for a in (gate, up, d_h))
  s = jax.nn.sigmoid(g)
  d_gate = d * u * s * (1.0 + g * (1.0 - s))
  return d_gate.astype(gate.dtype), (d * g * s).astype(up.dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


def _inverse_rms(x: jax.Array, eps: float) -> jax.Array:
  return jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)


@jax.custom_vjp
def _rms_norm(x: jax.Array, scale: jax.Array, eps: jax.Array) -> jax.Array:
  x32 = x.astype(jnp.float32)
  return x32 * _inverse_rms(x32, eps) * scale


def _rms_norm_fwd(x, scale, eps):
  return _rms_norm(x, scale, eps), (x, scale, eps)


def _rms_norm_bwd(residuals, d_y):
  x, scale, eps = residuals
  x32 = x.astype(jnp.float32)
  r = _inverse_rms(x32, eps)
  d_scaled = d_y * scale
  d_x = r * (d_scaled - x32 * r * r * jnp.mean(d_scaled * x32, axis=-1, keepdims=True))
  d_scale = jnp.sum((d_y * x32 * r).reshape(-1, x.shape[-1]), axis=0)
  return d_x.astype(x.dtype), d_scale, jnp.zeros_like(eps)


_rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """x * rsqrt(mean(x^2) + eps) * scale in float32.

  Args:
    x: [..., E] any float dtype.
    scale: [E] float32.
    eps: the variance floor.
  Returns:
    [..., E] float32 (the caller casts).
  """
  return _rms_norm(x, scale, jnp.asarray(eps, jnp.float32))

"""Per-token training losses shared by the model families (float32 whatever the compute dtype)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def next_token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-token negative log-likelihood. logits [B, T, V], targets [B, T] -> [B, T] float32."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


def distillation_kl(student_logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
  """KL(teacher || student) per position, [B, T, V] logits -> [B, T] float32 (DistillSpec)."""
  teacher_logp = jax.nn.log_softmax(teacher_logits.astype(jnp.float32), axis=-1)
  student_logp = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
  return jnp.sum(jnp.exp(teacher_logp) * (teacher_logp - student_logp), axis=-1)

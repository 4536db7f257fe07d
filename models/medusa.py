"""A causal target with Medusa heads (Cai et al. 2024, "Medusa: Simple LLM Inference Acceleration
Framework with Multiple Decoding Heads").

Head k (k = 1..K) reads the target's final hidden state at position t and predicts the token at
t + 1 + k, one more place ahead than the target's own next-token prediction. A head is one
residual SiLU block, h + SiLU(W_k h), on the final normalised hidden state, followed by the
target's own (frozen) vocabulary projection; W_k starts at zero, so an untrained head repeats the
target's next-token prediction. The heads read the hidden state with its gradient stopped, so they
never change the target's distribution.

Training (`loss`, `model.draft_heads.medusa=K`): the target's weights come from its trained run
(`train.init_from`) and stay frozen (`train.trainable="medusa"`); the loss is Medusa-1's,
sum_k 0.8^(k-1) CE(head k, x_{t+1+k}), on the data (the bench trains on the target's own
continuations, as Medusa's self-distillation does).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.causal_lm import CausalLM
from models.kv_cache import KVCache
from models.llama import Transformer
from models.losses import next_token_nll

HEAD_DECAY = 0.8  # Medusa-1's weight of head k: HEAD_DECAY ** (k - 1)


class MedusaHeads(nn.Module):
  """hidden [B, T, E] -> [B, T, K, E]: head k's residual SiLU block of the hidden state."""

  count: int
  dim: int

  @nn.compact
  def __call__(self, hidden: jax.Array) -> jax.Array:
    init = nn.with_logical_partitioning(nn.initializers.zeros, ("embed", "mlp"))
    blocks = [nn.Dense(self.dim, kernel_init=init, name=f"head_{k + 1}")
              for k in range(self.count)]
    return jnp.stack([hidden + nn.silu(block(hidden)) for block in blocks], axis=2)


class MedusaTransformer(Transformer):
  """The Llama decoder (same parameter paths) plus `medusa`, whose logits every call records in
  the "intermediates" collection as "medusa_logits" ([B, T, K, V] float32)."""

  def setup(self):
    super().setup()
    self.medusa = MedusaHeads(self.config.draft_heads.medusa, self.config.d_model)

  def _logits(self, x: jax.Array) -> jax.Array:
    hidden = jax.lax.stop_gradient(self.final_norm(x))
    heads = self.medusa(hidden)  # [B, T, K, E]
    project = self.embed.attend if self.config.tie_embeddings else self.head
    self.sow("intermediates", "medusa_logits", project(heads).astype(jnp.float32))
    return super()._logits(x)


def _recorded(variables: dict) -> jax.Array:
  return variables["intermediates"]["medusa_logits"][0]


@dataclasses.dataclass(frozen=True)
class MedusaLM(CausalLM):
  """A `CausalLM` with K Medusa heads (`model.draft_heads.medusa=K`): a target for
  `samplers.medusa`, its heads trained by `loss` on a frozen target."""

  @property
  def num_medusa_heads(self) -> int:
    return self.config.draft_heads.medusa

  @property
  def module(self) -> MedusaTransformer:
    return MedusaTransformer(self.config, remat=self.remat)

  def apply_with_heads(self, params, tokens: jax.Array, positions: jax.Array, cache: KVCache,
                       attention_mask: jax.Array | None = None
                       ) -> tuple[jax.Array, jax.Array, KVCache]:
    """`apply` plus the heads: ([B, T, V] logits, [B, T, K, V] head logits, cache)."""
    (logits, cache), variables = self.module.apply(
        {"params": params}, tokens, positions, cache, attention_mask, method=Transformer.decode,
        mutable=["intermediates"])
    return logits, _recorded(variables), cache

  def logits_with_heads(self, params, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Full causal forward: tokens [B, T] -> ([B, T, V] logits, [B, T, K, V] head logits)."""
    logits, variables = self.module.apply({"params": params}, tokens, mutable=["intermediates"])
    return logits, _recorded(variables)

  def loss(self, params, batch: jax.Array, key: jax.Array, teacher_logits: jax.Array | None = None,
           distill_weight: float = 1.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Medusa-1's loss on batch [B, L + 1]: head k's cross-entropy against the token k + 1
    places past the next (positions t < L - k), weighted HEAD_DECAY^(k-1) and summed; metrics
    `head_k_top1`, the fraction of positions where head k's argmax is that token."""
    del key, teacher_logits, distill_weight
    _, heads = self.logits_with_heads(params, batch[:, :-1])
    length = heads.shape[1]
    total, metrics = jnp.float32(0.0), {}
    for k in range(1, self.num_medusa_heads + 1):
      logits, targets = heads[:, :length - k, k - 1], batch[:, 1 + k:]
      total += HEAD_DECAY ** (k - 1) * next_token_nll(logits, targets).mean()
      metrics[f"head_{k}_top1"] = jnp.mean(jnp.argmax(logits, axis=-1) == targets)
    return total, metrics

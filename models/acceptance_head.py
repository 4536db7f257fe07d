"""A draft model with a SpecDec++ acceptance head (Huang et al. 2024, "SpecDec++: Boosting
Speculative Decoding via Adaptive Candidate Lengths").

The head is a small MLP on the draft's final normalised hidden state. At each position it predicts
the probability that a token drafted from that position's distribution q is accepted by the target
p; `samplers.adaptive` (rule "head") stops a row's drafting once 1 - prod_i a_i exceeds a
threshold. The head reads the hidden state with its gradient stopped, so it never changes the
draft's own distribution.

Training (`loss`, `model.draft_heads.acceptance=true`): the draft's weights come from a trained draft
(`train.init_from`) and stay frozen (`train.trainable="acceptance_head"`); the teacher
(`train.teacher_workdir`) is the target. At every position the label is the expected acceptance of
a token drawn from the draft, sum_x min(p(x), q(x)) = 1 - TV(p, q) (p, q at temperature 1), and
the loss is the binary cross-entropy of the head's prediction against it.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.scipy.special import xlogy

from models.causal_lm import CausalLM
from models.kv_cache import KVCache
from models.llama import Transformer


class AcceptanceHead(nn.Module):
  """hidden [B, T, E] -> [B, T] float32 acceptance logits (a two-layer SiLU MLP with biases)."""

  hidden: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    init = lambda names: nn.with_logical_partitioning(nn.initializers.lecun_normal(), names)
    x = x.astype(jnp.float32)
    h = nn.silu(nn.Dense(self.hidden, kernel_init=init(("embed", "mlp")), name="hidden")(x))
    return nn.Dense(1, kernel_init=init(("mlp", None)), name="out")(h)[..., 0]


def acceptance_label(teacher_logits: jax.Array, draft_logits: jax.Array) -> jax.Array:
  """[B, T, V] logits -> [B, T] float32 sum_x min(p, q) = 1 - TV(p, q), gradient-stopped: the
  chance that speculative sampling accepts a token drawn from q = softmax(draft_logits) when the
  target is p = softmax(teacher_logits)."""
  p = jax.nn.softmax(teacher_logits.astype(jnp.float32), axis=-1)
  q = jax.nn.softmax(draft_logits.astype(jnp.float32), axis=-1)
  return jax.lax.stop_gradient(jnp.sum(jnp.minimum(p, q), axis=-1))


class AcceptanceTransformer(Transformer):
  """The Llama decoder (same parameter paths) plus `acceptance_head`, whose logits every call
  records in the "intermediates" collection as "acceptance_logit" ([B, T])."""

  def setup(self):
    super().setup()
    self.acceptance_head = AcceptanceHead(self.config.d_model)

  def _logits(self, x: jax.Array) -> jax.Array:
    hidden = jax.lax.stop_gradient(self.final_norm(x))
    self.sow("intermediates", "acceptance_logit", self.acceptance_head(hidden))
    return super()._logits(x)


def _recorded(variables: dict) -> jax.Array:
  return variables["intermediates"]["acceptance_logit"][0]


@dataclasses.dataclass(frozen=True)
class AcceptanceDraftLM(CausalLM):
  """A `CausalLM` with an acceptance head (`model.draft_heads.acceptance=true`): a draft for
  `samplers.adaptive`'s rule "head", trained by `loss` against a target."""

  @property
  def module(self) -> AcceptanceTransformer:
    return AcceptanceTransformer(self.config, remat=self.remat)

  def apply_with_acceptance(self, params, tokens: jax.Array, positions: jax.Array,
                            cache: KVCache) -> tuple[jax.Array, jax.Array, KVCache]:
    """`apply` plus the head: ([B, T, V] logits, [B, T] float32 acceptance logits, cache)."""
    (logits, cache), variables = self.module.apply(
        {"params": params}, tokens, positions, cache, method=Transformer.decode,
        mutable=["intermediates"])
    return logits, _recorded(variables), cache

  def logits_with_acceptance(self, params, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Full causal forward: tokens [B, T] -> ([B, T, V] logits, [B, T] acceptance logits)."""
    logits, variables = self.module.apply({"params": params}, tokens, mutable=["intermediates"])
    return logits, _recorded(variables)

  def loss(self, params, batch: jax.Array, key: jax.Array, teacher_logits: jax.Array | None = None,
           distill_weight: float = 1.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean binary cross-entropy of the head against `acceptance_label(teacher, draft)` over
    batch [B, L + 1]'s first L positions; metrics `acceptance` (the mean label), `predicted`
    (the mean prediction) and `bce_excess` (the loss minus the labels' own binary entropy, the
    least any prediction reaches: 0 is a perfect head)."""
    del key, distill_weight
    if teacher_logits is None:
      raise ValueError("model.draft_heads.acceptance=true trains the acceptance head against a target: "
                       "set train.teacher_workdir to the target's run")
    logits, acceptance_logit = self.logits_with_acceptance(params, self.teacher_inputs(batch))
    label = acceptance_label(teacher_logits, logits)
    bce = optax.sigmoid_binary_cross_entropy(acceptance_logit, label).mean()
    entropy = -(xlogy(label, label) + xlogy(1.0 - label, 1.0 - label))
    return bce, {"acceptance": label.mean(), "predicted": jax.nn.sigmoid(acceptance_logit).mean(),
                 "bce_excess": bce - entropy.mean()}

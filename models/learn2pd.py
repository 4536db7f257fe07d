"""`Learn2PD`: a masked-diffusion denoiser plus a learned unmasking policy (Bao et al. 2025,
"Accelerating Diffusion LLMs via Learnable Parallel Decoding").

A small filter head (`FinalityHead`, an MLP) reads, per position, the denoiser's final hidden
state and four confidence features of its SUBS distribution (max probability, top-1 minus top-2
margin, entropy, is-masked), all with gradients stopped, and predicts whether the position's
current greedy prediction is already *final*: equal to the token greedy decoding ends with. A
sampler may then commit every masked position whose finality probability passes a threshold
(Learn2PD's rule; the end-of-text stop, EoTP, is the sampler's: a row is done once an end-of-text
token is committed with everything before it; see `samplers.core.denoiser_protocol`).

Training (`loss`), with the denoiser frozen (`train.init_from` = a trained "mdlm" workdir of the
same shape, `train.trainable` = "filter"): per row, the first quarter of the L tokens is the prompt
and the rest starts masked; greedy confidence decoding (`model.finality.steps` steps, each
committing its share of the most confident masked positions) gives a trajectory; at every step and
every still-masked position the label is "the step's argmax equals the final sequence's token",
and the loss is the binary cross-entropy of the head over all those decisions. `eval_nll` returns
the same summed cross-entropy and the decision count, so the trainer's held-out "bits per byte" is
bits per finality decision for this kind.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from models import conditioning
from models.attention import block_causal_mask
from models.diffusion import MaskedDiffusionLM, reject_teacher, sequence_positions, subs_log_probs
from models.llama import Transformer


class FinalityHead(nn.Module):
  """features [B, T, F] float32 -> [B, T] finality logits (a two-layer GELU MLP)."""

  hidden: int

  @nn.compact
  def __call__(self, features: jax.Array) -> jax.Array:
    init = lambda: nn.with_logical_partitioning(nn.initializers.lecun_normal(), (None, None))
    h = nn.gelu(nn.Dense(self.hidden, kernel_init=init(), name="hidden")(features))
    return nn.Dense(1, kernel_init=init(), name="out")(h)[..., 0]


def confidence_features(log_probs: jax.Array, tokens: jax.Array, mask_id: int) -> jax.Array:
  """SUBS log-probs [B, T, V] -> [B, T, 4] float32: max probability, top-1 minus top-2 probability,
  entropy, and 1 where the input is masked."""
  probs = jnp.exp(log_probs)
  top2 = jax.lax.top_k(probs, 2)[0]
  entropy = -jnp.sum(jnp.where(probs > 0, probs * log_probs, 0.0), axis=-1)
  masked = (tokens == mask_id).astype(jnp.float32)
  return jnp.stack([top2[..., 0], top2[..., 0] - top2[..., 1], entropy, masked], axis=-1)


class FilteredTransformer(Transformer):
  """The denoiser's transformer (same parameter paths) plus the `filter` head."""

  def setup(self):
    super().setup()
    self.filter = FinalityHead(self.config.finality.dim)

  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
               mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """([B, T, V] SUBS log-probs, [B, T] finality logits) under `mask` (positions 0..T-1 and the
    model's block rule when None)."""
    log_probs, features = self.features(tokens, positions, mask)
    return log_probs, self.filter(features)

  def features(self, tokens: jax.Array, positions: jax.Array | None = None,
               mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """([B, T, V] SUBS log-probs, [B, T, E + 4] head inputs, gradient-stopped)."""
    if positions is None:
      positions = sequence_positions(tokens)
    if mask is None:
      mask = block_causal_mask(positions, self.config.diffusion.block_size)
    x = self._causal(tokens, positions, mask)[0]
    log_probs = subs_log_probs(self._logits(x), tokens, self.config.diffusion.mask_id)
    hidden = self.final_norm(x).astype(jnp.float32)
    features = jnp.concatenate(
        [hidden, confidence_features(log_probs, tokens, self.config.diffusion.mask_id)], axis=-1)
    return log_probs, jax.lax.stop_gradient(features)

  def head(self, features: jax.Array) -> jax.Array:
    return self.filter(features)


@dataclasses.dataclass(frozen=True)
class Learn2PD(MaskedDiffusionLM):
  """An "mdlm" denoiser with a finality head (`config.kind` "learn2pd"); a `CachedDenoiser` that
  also offers `denoise_with_finality`."""

  @property
  def module(self) -> FilteredTransformer:
    return FilteredTransformer(self.config, remat=self.remat)

  def denoise_with_finality(self, params, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """tokens [B, T] int32 -> ([B, T, V] SUBS log-probs as `denoise`, [B, T] float32 logits of
    "this position's argmax is final"), one pass."""
    return self.module.apply({"params": params}, tokens)

  def trajectory(self, params, tokens: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Greedy confidence decoding of tokens [B, L] from its first L // 4 (at least one) tokens,
    or, when conditional (`model.diffusion.response_after`), from its prompts with the responses
    masked.

    Returns (features [K, B, L, F] of the K states, their argmax [K, B, L], masked [K, B, L]
    bool) with K = config.finality.steps; step k commits the most confident masked positions so
    that ceil(N (k + 1) / K) of the N initially masked ones are committed after it, so the last
    state is complete. Gradient-free."""
    batch, length = tokens.shape
    if self.config.diffusion.response_after:
      generated = conditioning.response_positions(tokens, self.config.diffusion.response_after)
    else:
      generated = jnp.broadcast_to(jnp.arange(length) >= max(1, length // 4), tokens.shape)
    masked_total = jnp.sum(generated, axis=-1, keepdims=True)
    steps = self.config.finality.steps
    start = jnp.where(generated, self.mask_id, tokens)

    def step(state, k):
      log_probs, features = self.module.apply({"params": params}, state,
                                              method=FilteredTransformer.features)
      prediction = jnp.argmax(log_probs, axis=-1).astype(jnp.int32)
      masked = state == self.mask_id
      confidence = jnp.where(masked, jnp.max(log_probs, axis=-1), -jnp.inf)
      target = -(-masked_total * (k + 1) // steps)
      quota = target - (masked_total - jnp.sum(masked, axis=-1, keepdims=True))  # per row
      order = jnp.argsort(jnp.argsort(-confidence, axis=-1), axis=-1)
      commit = masked & (order < quota)
      return jnp.where(commit, prediction, state), (features, prediction, masked)

    final, (features, predictions, masked) = jax.lax.scan(
        step, start, jnp.arange(steps, dtype=jnp.int32))
    del final
    return jax.lax.stop_gradient((features, predictions, masked))

  def decisions(self, params, batch: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per decision (step, row, masked position) of batch [B, L + 1]'s trajectory: (head logits
    [K, B, L], labels [K, B, L] float32, weights [K, B, L] float32, 1 at masked positions)."""
    features, predictions, masked = self.trajectory(params, batch[:, :-1])
    final = predictions[-1]  # SUBS copies committed tokens; the last step commits the rest
    labels = (predictions == final[None]).astype(jnp.float32)
    logits = self.module.apply({"params": params}, features, method=FilteredTransformer.head)
    return logits, labels, masked.astype(jnp.float32)

  def loss(self, params, batch: jax.Array, key: jax.Array, teacher_logits: jax.Array | None = None,
           distill_weight: float = 1.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean binary cross-entropy of the finality head over the trajectory's masked decisions."""
    del key, distill_weight
    reject_teacher(teacher_logits)
    logits, labels, weights = self.decisions(params, batch)
    bce = optax.sigmoid_binary_cross_entropy(logits, labels)
    count = jnp.sum(weights)
    correct = ((logits > 0) == (labels > 0.5)).astype(jnp.float32)
    return jnp.sum(bce * weights) / count, {
        "finality_accuracy": jnp.sum(correct * weights) / count,
        "final_rate": jnp.sum(labels * weights) / count}

  def eval_nll(self, params, batch: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(summed binary cross-entropy in nats, number of decisions); deterministic."""
    del key
    logits, labels, weights = self.decisions(params, batch)
    bce = optax.sigmoid_binary_cross_entropy(logits, labels)
    return jnp.sum(bce * weights), jnp.sum(weights)


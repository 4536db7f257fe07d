"""A causal target with an EAGLE draft head (Li et al. 2024, "EAGLE: Speculative Sampling Requires
Rethinking Feature Uncertainty").

The target's *features* are its final normalised hidden states, f_t at position t: what its
vocabulary projection turns into the distribution of token t + 1. The draft head autoregresses
on features rather than tokens. Its input at position t is the pair (f_t, x_{t+1}): the feature
and the token sampled from it, which removes the feature's uncertainty about which token came
next. A fully connected layer maps concat(embed(x_{t+1}), f_t) [2E] to E, one decoder block (the
target's block shape, its MLP width `model.draft_heads.eagle_mlp_dim`, with its own one-layer
KV cache) turns it into the predicted feature f'_{t+1}, and the target's (frozen) vocabulary
projection turns f'_{t+1} into the draft's distribution of token t + 2. While drafting, the head
feeds its own predicted features back in.

Training (`loss`, `model.draft_heads.eagle=true`): the target's weights come from its trained run
(`train.init_from`) and stay frozen (`train.trainable="eagle"`); the loss is EAGLE's,
SmoothL1(f'_{t+1}, f_{t+1}) + CLS_WEIGHT * CE(p_{t+2}, p'_{t+2}) against the target's own
features and distributions, with the input features jittered by uniform noise in
[-FEATURE_NOISE, FEATURE_NOISE] (EAGLE's augmentation against the errors of the head's own
predicted features, which it reads while drafting).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from models.causal_lm import CausalLM
from models.kv_cache import KVCache
from models.llama import Block, Transformer, _dense

CLS_WEIGHT = 0.1  # EAGLE's weight of the classification term
FEATURE_NOISE = 0.1  # EAGLE's training noise: U(-FEATURE_NOISE, FEATURE_NOISE) per unit


class EagleHead(nn.Module):
  """(features [B, T, E], embedded next tokens [B, T, E]) -> predicted next features [B, T, E]."""

  config: object

  @nn.compact
  def __call__(self, features, embedded, positions, mask=None, cache=None, rows=None):
    """`positions` [B, T] int32; `mask`, `cache` and `rows` as `llama.Block` (cache: the head's
    one layer). Returns ([B, T or R, E] predicted features, the block's keys/values)."""
    cfg = self.config
    x = _dense(cfg, cfg.d_model, ("mlp", "embed"), name="fuse")(
        jnp.concatenate([embedded.astype(features.dtype), features], axis=-1))
    width = cfg.draft_heads.eagle_mlp_dim or cfg.mlp_dim
    return Block(dataclasses.replace(cfg, mlp_dim=width), name="layer")(x, positions, mask, cache,
                                                                        rows)


class EagleTransformer(Transformer):
  """The Llama decoder (same parameter paths) plus `eagle`. Every target call records its
  features (the final normalised hidden states, [B, T, E]) in "intermediates" as "features"."""

  def setup(self):
    super().setup()
    self.eagle = EagleHead(self.config)

  def _logits(self, x: jax.Array) -> jax.Array:
    features = self.final_norm(x)
    self.sow("intermediates", "features", features)
    if self.is_initializing():  # `init` runs the plain forward: create the head's parameters too
      tokens = jnp.zeros(features.shape[:2], jnp.int32)
      self.draft(features, tokens, jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape))
    return self._project(features)

  def _project(self, features: jax.Array) -> jax.Array:
    """[B, T, E] features -> [B, T, V] float32 logits (the target's vocabulary projection)."""
    logits = self.embed.attend(features) if self.config.tie_embeddings else self.head(features)
    return nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "length", "vocab"))

  def draft(self, features, tokens, positions, cache=None, mask=None, rows=None):
    """The head on pairs (features [B, T, E], next tokens [B, T]) at `positions` [B, T].

    Without `cache`, over the T pairs alone (training; `mask` [B or 1, T, T], None = causal);
    with one (a one-layer KVCache), the pairs are appended to it (`mask` over them, None =
    causal), and `rows` [B, R] (optional) picks the pairs whose outputs are wanted: every pair
    is written to the cache, but only those R go through the block's attention queries, MLP
    and the vocabulary projection. Returns ([B, T or R, V] float32 draft logits, [B, T or R, E]
    predicted features, the updated cache or None).
    """
    steps = tokens.shape[1]
    if cache is not None and mask is None:
      mask = jnp.tril(jnp.ones((1, steps, steps), bool))
    layer_cache = None if cache is None else (cache.keys[0], cache.values[0], cache.lengths)
    predicted, (k, v) = self.eagle(jax.lax.stop_gradient(features), self.embed(tokens),
                                   positions, mask, layer_cache, rows)
    if cache is not None:
      cache = cache.replace(keys=(k,), values=(v,), lengths=cache.lengths + steps)
    return self._project(predicted), predicted, cache


def _features(variables: dict) -> jax.Array:
  return variables["intermediates"]["features"][0]


@dataclasses.dataclass(frozen=True)
class EagleLM(CausalLM):
  """A `CausalLM` with an EAGLE draft head (`model.draft_heads.eagle=true`): a target for
  `samplers.eagle`, its head trained by `loss` on a frozen target."""

  has_eagle_head = True

  @property
  def module(self) -> EagleTransformer:
    return EagleTransformer(self.config, remat=self.remat)

  def apply_with_features(self, params, tokens: jax.Array, positions: jax.Array, cache: KVCache,
                          attention_mask: jax.Array | None = None
                          ) -> tuple[jax.Array, jax.Array, KVCache]:
    """`apply` plus the target's features: ([B, T, V] logits, [B, T, E] features, cache)."""
    (logits, cache), variables = self.module.apply(
        {"params": params}, tokens, positions, cache, attention_mask, method=Transformer.decode,
        mutable=["intermediates"])
    return logits, _features(variables), cache

  def prefill_with_features(self, params, tokens: jax.Array, positions: jax.Array,
                            cache: KVCache) -> tuple[jax.Array, jax.Array, KVCache]:
    """`prefill` (the first call, with `config.attention`: sequence-parallel on a mesh) plus the
    features: ([B, T, V] logits, [B, T, E] features, cache)."""
    (logits, cache), variables = self.module.apply(
        {"params": params}, tokens, positions, cache, method=Transformer.prefill,
        mutable=["intermediates"])
    return logits, _features(variables), cache

  def init_draft_cache(self, batch: int, max_len: int | None = None) -> KVCache:
    """An empty one-layer cache for the draft head."""
    cfg = self.config
    return KVCache.zeros(1, batch, max_len or cfg.max_len, cfg.num_kv_heads,
                         cfg.resolved_head_dim, jnp.dtype(cfg.dtype))

  def draft(self, params, features: jax.Array, tokens: jax.Array, positions: jax.Array,
            cache: KVCache, attention_mask: jax.Array | None = None,
            rows: jax.Array | None = None) -> tuple[jax.Array, jax.Array, KVCache]:
    """Appends T pairs (features [B, T, E] of positions t, tokens [B, T] at t + 1) at positions
    t [B, T] to the head's cache: ([B, T, V] draft logits of the tokens at t + 2, [B, T, E]
    predicted features of t + 1, cache advanced by T). With `rows` [B, R] int32, the outputs
    are those pairs' only ([B, R, V], [B, R, E]), computed for them alone."""
    return self.module.apply({"params": params}, features, tokens, positions, cache,
                             attention_mask, rows, method=EagleTransformer.draft)

  def features(self, params, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Full causal forward: tokens [B, T] -> ([B, T, V] logits, [B, T, E] features)."""
    logits, variables = self.module.apply({"params": params}, tokens, mutable=["intermediates"])
    return logits, _features(variables)

  def loss(self, params, batch: jax.Array, key: jax.Array, teacher_logits: jax.Array | None = None,
           distill_weight: float = 1.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """EAGLE's loss on batch [B, L + 1] (module docstring) over the L - 1 pairs (f_t, x_{t+1}),
    averaged over the rollout's steps (`rollout_mask`; `model.draft_heads.eagle_rollout`).
    Metrics: `feature_loss`, `cls_loss`, and `draft_top1` (`draft_top1_k` for rollout step k),
    the fraction of pairs where the head's argmax is the target's: its greedy acceptance of a
    first (k-th) draft."""
    del teacher_logits, distill_weight
    tokens = batch[:, :-1]
    logits, features = jax.lax.stop_gradient(self.features(params, tokens))
    target = jax.nn.softmax(logits[:, 1:])
    noisy = features[:, :-1] + FEATURE_NOISE * jax.random.uniform(key, features[:, :-1].shape,
                                                                   minval=-1.0)
    steps = self.config.draft_heads.eagle_rollout
    total, metrics = jnp.float32(0.0), {}
    for k, (draft_logits, predicted) in enumerate(zip(*self.rollout(params, noisy, tokens[:, 1:],
                                                                    steps)), start=1):
      feature_loss = jnp.mean(optax.huber_loss(predicted, features[:, 1:]))  # smooth L1
      cls_loss = -jnp.mean(jnp.sum(target * jax.nn.log_softmax(draft_logits), axis=-1))
      total += (feature_loss + CLS_WEIGHT * cls_loss) / steps
      top1 = jnp.mean(jnp.argmax(draft_logits, -1) == jnp.argmax(logits[:, 1:], -1))
      if k == 1:
        metrics |= {"feature_loss": feature_loss, "cls_loss": cls_loss, "draft_top1": top1}
      else:
        metrics[f"draft_top1_{k}"] = top1
    return total, metrics

  def rollout(self, params, features: jax.Array, tokens: jax.Array,
              steps: int) -> tuple[list[jax.Array], list[jax.Array]]:
    """The head on L pairs (features [B, L, E] of positions 0..L-1, tokens [B, L] after them),
    then `steps` - 1 times on the same pairs with the features it predicted one step earlier
    (`rollout_mask`; f_0 stays as given). Returns per step ([B, L, V] logits, [B, L, E]
    predicted features): step k's output at t is what the head drafts k-th after a verified
    context of positions <= t - k + 1."""
    length = tokens.shape[1]
    positions = jnp.broadcast_to(jnp.arange(length), tokens.shape)
    inputs, logits, predicted = [features], [], []
    for k in range(1, steps + 1):
      out, feature, _ = self.module.apply(
          {"params": params}, jnp.concatenate(inputs, axis=1), jnp.tile(tokens, (1, k)),
          jnp.tile(positions, (1, k)), None, jnp.asarray(rollout_mask(k, length))[None],
          method=EagleTransformer.draft)
      logits.append(out[:, -length:])
      predicted.append(feature[:, -length:])
      inputs.append(jnp.concatenate([features[:, :1], predicted[-1][:, :-1]], axis=1))
    return logits, predicted


def rollout_mask(step: int, length: int) -> np.ndarray:
  """[step * L, step * L] bool attention of EAGLE-3's training-time test over `step` copies of
  the L pairs (copy m: pairs whose features are the head's own (m - 1)-step predictions).

  While drafting, the head's m-th draft after a verified context reads the pairs of that context
  (true features) and the m - 1 pairs it fed itself since (predicted features). So copy m's pair
  at position t sees copy 1's pairs at positions <= t - m + 1 and copy m' 's pair at position
  t - (m - m') for 2 <= m' <= m (itself included), which trains the head on its own mistakes.
  """
  index = np.arange(length)
  mask = np.zeros((step * length, step * length), bool)
  for m in range(1, step + 1):
    rows = slice((m - 1) * length, m * length)
    mask[rows, :length] = index[None, :] <= index[:, None] - m + 1
    for earlier in range(2, m + 1):
      cols = slice((earlier - 1) * length, earlier * length)
      mask[rows, cols] = index[None, :] == index[:, None] - (m - earlier)
  return mask

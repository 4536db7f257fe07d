"""`MaskedDiffusionLM`: a masked-diffusion denoiser (MDLM, Sahoo et al. 2024) on the Llama blocks.

The transformer of `models.llama` with its causal mask replaced: bidirectional (`block_size` 0), or
block-causal (`block_size` B > 0: a position sees its own block and every earlier one, as in block
diffusion, Arriola et al. 2025), so that finished blocks can be KV-cached exactly.

Objective: the continuous-time ELBO of `models.noise_schedule`: for t ~ U(0, 1], mask each token
with probability 1 - alpha_t and pay w(t) = -alpha'_t / (1 - alpha_t) times the cross-entropy of
every masked token, divided by the sequence length. With SUBS (mask logit -inf, unmasked positions
copy their input) this bounds -log p of the sequence under the model's reverse process from above,
so the trainer's held-out loss / bits per byte (`eval_nll`, one draw of t and the mask per row, from
the eval step's fixed key) is an upper bound, not a likelihood.

With `model.diffusion.response_after` set, only response positions are noised
(`models.conditioning`): the loss and bound are those of the response given its clean prompt, per
response token.

A block-causal model is trained as block diffusion: each block has its own t and is denoised given
the *clean* earlier blocks, in one pass over the 2L tokens [noisy x_t, clean x] (the noisy block b
sees itself and clean blocks < b; clean block b sees clean blocks <= b). The bound is then the sum
over blocks of their ELBOs given the prefix, and decoding block by block over a cache of clean
blocks sees exactly what training saw.

A frozen, hashable dataclass (a static argument of `jax.jit`) meeting
`samplers.core.denoiser_protocol.CachedDenoiser`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from models import conditioning, noise_schedule
from models.attention import block_causal_mask
from models.config import DIFFUSION_MIN_T
from models.base import TransformerModel
from models.kv_cache import KVCache
from models.llama import Transformer
from models.losses import next_token_nll

# Training draws t from (model.diffusion.min_t, 1], default DIFFUSION_MIN_T: near t = 0 almost
# nothing is masked while w(t) ~ 1/t, a rare huge-weight term that only adds gradient variance
# (MDLM's sampling eps). Eval uses (0, 1].


def row_floors(batch: int, min_t: float, fraction: float) -> jax.Array:
  """[B, 1] the lower end of each row's t: min_t on a `fraction` of the rows, spread evenly
  (row r when floor((r + 1) q) > floor(r q)), DIFFUSION_MIN_T on the others."""
  rows = jnp.arange(batch, dtype=jnp.float32)
  chosen = jnp.floor((rows + 1) * fraction) > jnp.floor(rows * fraction)
  return jnp.where(chosen, min_t, min(min_t, DIFFUSION_MIN_T))[:, None]


def subs_log_probs(logits: jax.Array, tokens: jax.Array, mask_id: int) -> jax.Array:
  """SUBS parameterisation: logits [B, T, V] of the network, tokens [B, T] its input ->
  [B, T, V] float32 log-probabilities of the clean token: at a masked input the network's
  distribution with the mask excluded (logit -inf); at an unmasked input 0 on its own token and
  -inf elsewhere (carry-over)."""
  vocab = logits.shape[-1]
  ids = jnp.arange(vocab)
  logp = jax.nn.log_softmax(jnp.where(ids == mask_id, -jnp.inf, logits.astype(jnp.float32)))
  copy = jnp.where(ids == tokens[..., None], 0.0, -jnp.inf)
  return jnp.where((tokens == mask_id)[..., None], logp, copy)


def block_diffusion_mask(positions: jax.Array, block_size: int) -> jax.Array:
  """Mask over the 2L training tokens [noisy x_t (L), clean x (L)], positions [B, L] ->
  [B, 2L, 2L] bool: a noisy token sees the noisy tokens of its own block and the clean tokens of
  earlier blocks; a clean token sees clean tokens of its own and earlier blocks (block-causal)."""
  blocks = positions // block_size
  same = blocks[:, :, None] == blocks[:, None, :]
  earlier = blocks[:, :, None] > blocks[:, None, :]
  top = jnp.concatenate([same, earlier], axis=2)
  bottom = jnp.concatenate([jnp.zeros_like(same), same | earlier], axis=2)
  return jnp.concatenate([top, bottom], axis=1)


@dataclasses.dataclass(frozen=True)
class MaskedDiffusionLM(TransformerModel):
  """Masked-diffusion denoiser (`config.kind` "mdlm") meeting `CachedDenoiser`."""

  @property
  def block_size(self) -> int:
    return self.config.diffusion.block_size

  def network(self, params, tokens: jax.Array, positions: jax.Array,
              mask: jax.Array) -> jax.Array:
    """Raw transformer logits [B, T, V] float32 under an explicit attention mask [B|1, T, T]."""
    return self.module.apply({"params": params}, tokens, positions, mask,
                             method=Transformer.__call__)

  def denoise(self, params, tokens: jax.Array) -> jax.Array:
    """tokens [B, T] int32 (some mask_id) at positions 0..T-1 -> [B, T, V] float32 SUBS
    log-probabilities of the clean tokens, under the model's own attention (bidirectional or
    block-causal). Not conditioned on t."""
    positions = sequence_positions(tokens)
    raw = self.network(params, tokens, positions, block_causal_mask(positions, self.block_size))
    return subs_log_probs(raw, tokens, self.mask_id)

  def init_cache(self, batch: int, max_len: int | None = None) -> KVCache:
    """An empty cache of `max_len` slots per row (default: config.max_len), compute dtype."""
    cfg = self.config
    return KVCache.zeros(cfg.num_layers, batch, max_len or cfg.max_len, cfg.num_kv_heads,
                         cfg.resolved_head_dim, jnp.dtype(cfg.dtype))

  def apply(self, params, tokens: jax.Array, positions: jax.Array, cache: KVCache,
            attention_mask: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
    """Cached call: tokens/positions [B, T] int32 see every cache slot below `cache.lengths` and
    each other as attention_mask [B, T, T] says; None means the model's own rule on their
    positions (all-true when bidirectional, `block_causal_mask` when block-causal, so a prompt
    of several blocks can be cached in one call). Returns ([B, T, V] SUBS log-probabilities,
    cache advanced by T). For a block-causal model, caching clean blocks and then scoring a block
    gives exactly `denoise` on the concatenation; for a bidirectional one it is an approximation
    (cached keys never see later tokens)."""
    if attention_mask is None:
      attention_mask = block_causal_mask(positions, self.block_size)
    raw, cache = self.module.apply({"params": params}, tokens, positions, cache, attention_mask,
                                   method=Transformer.decode)
    return subs_log_probs(raw, tokens, self.mask_id), cache

  # ------------------------------------------------------------------ training interface

  def corrupt(self, tokens: jax.Array, key: jax.Array,
              floor: float | jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Forward process: tokens [B, L] -> (noisy [B, L], masked [B, L] bool, per-token t [B, L]),
    t from (floor, 1] (floor: a float or [B, 1] per row).

    One stratified t per row (per row and block when block-causal); only `conditioning.noisable`
    positions are ever masked."""
    batch, length = tokens.shape
    time_key, mask_key = jax.random.split(key)
    if self.block_size:
      blocks = -(-length // self.block_size)
      t = noise_schedule.stratified_times(time_key, (batch, blocks), floor)
      t = t[:, jnp.arange(length) // self.block_size]
    else:
      t = jnp.broadcast_to(noise_schedule.stratified_times(time_key, (batch, 1), floor),
                           (batch, length))
    prob = noise_schedule.mask_probability(self.config.diffusion.schedule, t)
    masked = jax.random.uniform(mask_key, (batch, length)) < prob
    masked &= conditioning.noisable(tokens, self.config.diffusion.response_after)
    return jnp.where(masked, self.mask_id, tokens), masked, t

  def clean_logits(self, params, noisy: jax.Array, clean: jax.Array) -> jax.Array:
    """Training forward: [B, L, V] raw logits at the noisy tokens. Bidirectional: one pass over
    `noisy`; block-causal: one pass over [noisy, clean] under `block_diffusion_mask`."""
    positions = sequence_positions(noisy)
    if not self.block_size:
      return self.network(params, noisy, positions, block_causal_mask(positions, 0))
    both = jnp.concatenate([noisy, clean], axis=1)
    mask = block_diffusion_mask(positions, self.block_size)
    return self.network(params, both, jnp.concatenate([positions, positions], axis=1),
                        mask)[:, :noisy.shape[1]]

  def elbo(self, params, tokens: jax.Array, key: jax.Array,
           floor: float | jax.Array = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """One-sample ELBO estimate per row: tokens [B, L] -> ([B] nats, metrics). Unbiased for the
    continuous-time bound when floor = 0."""
    rows, metrics, _, _ = self._elbo_terms(params, tokens, key, floor)
    return rows, metrics

  def _elbo_terms(self, params, tokens, key, floor):
    """(ELBO rows [B], metrics, logits [B, L, V] with the mask excluded, masked [B, L])."""
    noisy, masked, t = self.corrupt(tokens, key, floor)
    logits = self.clean_logits(params, noisy, tokens)
    logits = jnp.where(jnp.arange(self.vocab_size) == self.mask_id, -jnp.inf, logits)
    nll = next_token_nll(logits, tokens)
    weight = noise_schedule.loss_weight(self.config.diffusion.schedule, t)
    rows = jnp.sum(jnp.where(masked, weight * nll, 0.0), axis=-1)
    count = jnp.maximum(jnp.sum(masked), 1)
    metrics = {"masked_nll": jnp.sum(jnp.where(masked, nll, 0.0)) / count,
               "mask_rate": jnp.mean(masked.astype(jnp.float32))}
    return rows, metrics, logits, masked

  def _noisable_count(self, tokens: jax.Array) -> jax.Array:
    """How many tokens the bound covers: all, or the response tokens (at least 1)."""
    count = jnp.sum(conditioning.noisable(tokens, self.config.diffusion.response_after))
    return jnp.maximum(count, 1).astype(jnp.float32)

  def loss(self, params, batch: jax.Array, key: jax.Array, teacher_logits: jax.Array | None = None,
           distill_weight: float = 1.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """ELBO per (noisable) token, nats, of the first L tokens of batch [B, L + 1], t from
    (model.diffusion.min_t, 1] on `model.diffusion.min_t_rows` of the rows (`row_floors`), plus
    `model.diffusion.certainty_weight` times the certainty term (`certainty`)."""
    del distill_weight
    reject_teacher(teacher_logits)
    tokens = batch[:, :-1]
    diffusion = self.config.diffusion
    floors = row_floors(tokens.shape[0], diffusion.min_t, diffusion.min_t_rows)
    rows, metrics, logits, masked = self._elbo_terms(params, tokens, key, floors)
    loss = jnp.sum(rows) / self._noisable_count(tokens)
    if diffusion.certainty_weight:
      entropy, correct = certainty(logits, tokens, masked)
      metrics = dict(metrics, certainty_entropy=entropy, correct_masked=correct)
      loss = loss + diffusion.certainty_weight * entropy
    return loss, metrics

  def eval_nll(self, params, batch: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(summed ELBO in nats, noisable token count) over the first L tokens of batch [B, L + 1]: an
    unbiased one-sample estimate of an upper bound on the model's nll (of the responses given
    their prompts, when conditional)."""
    tokens = batch[:, :-1]
    rows, _ = self.elbo(params, tokens, key)
    return jnp.sum(rows), self._noisable_count(tokens)

  @staticmethod
  def teacher_inputs(batch: jax.Array) -> jax.Array:
    """Distillation is for causal models; `loss` rejects teacher logits."""
    return batch[:, :-1]


def certainty(logits: jax.Array, tokens: jax.Array, masked: jax.Array
              ) -> tuple[jax.Array, jax.Array]:
  """dParallel's certainty-forcing term (Chen et al. 2025): the mean entropy, nats, of the
  model's distributions at the masked positions it already predicts correctly (argmax equal to
  the clean token; the selection carries no gradient), and the share of masked positions that
  are. Minimising it makes correct predictions confident, so that threshold rules commit them in
  parallel, without pushing confidence onto wrong ones.

  Args:
    logits: [B, L, V] with the mask's logit -inf; tokens: [B, L] clean; masked: [B, L] bool.
  Returns:
    (entropy [], correct share []).
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  finite = jnp.where(jnp.isfinite(logp), logp, 0.0)  # the mask's -inf: no 0 * inf gradient
  entropy = -jnp.sum(jnp.exp(logp) * finite, axis=-1)
  right = masked & (jnp.argmax(logits, axis=-1) == tokens)
  count = jnp.sum(right)
  mean = jnp.sum(jnp.where(right, entropy, 0.0)) / jnp.maximum(count, 1)
  return mean, count / jnp.maximum(jnp.sum(masked), 1)


def sequence_positions(tokens: jax.Array) -> jax.Array:
  return jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)


def reject_teacher(teacher_logits) -> None:
  if teacher_logits is not None:
    raise ValueError("distillation (train.teacher_workdir) needs a causal model (model.kind="
                     "'llama'); train masked-diffusion and any-subset models on the data alone")


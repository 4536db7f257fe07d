"""The model protocols of the diffusion-style samplers (masked diffusion and any-subset AR).

Like `samplers.core.protocol.CausalModel`, these are small, documented and met both by the real models
in `models/` and by tabular toy models in tests whose exact joint is enumerable, so every diffusion
sampler can be checked against brute force. Samplers never import `models`.
"""

from __future__ import annotations

from typing import Any, Protocol

import jax


class Denoiser(Protocol):
  """A masked-diffusion denoiser (MDLM). Implementations must be hashable (jit static args).

  Attributes:
    vocab_size: V, the number of token ids (the mask id included).
    max_len: the longest sequence the model accepts.
    mask_id: the id of the mask token.
    block_size: 0 for a fully bidirectional denoiser; B > 0 when attention is block-causal (a
      position sees its own block of B positions and every earlier block, never a later one).
  """

  vocab_size: int
  max_len: int
  mask_id: int
  block_size: int

  def denoise(self, params: Any, tokens: jax.Array) -> jax.Array:
    """tokens [B, T] int32 (some equal to mask_id) -> [B, T, V] float32 logits of the clean token
    at every position (SUBS: the mask logit is -inf; an unmasked position puts all its mass on its
    own token). Not conditioned on the noise level, so an unchanged input can reuse its output."""


class CachedDenoiser(Denoiser, Protocol):
  """A denoiser that can also score a block on top of a KV cache of earlier blocks (block decoding).

  `init_cache` and `apply` have the signatures of `samplers.core.protocol.CausalModel`: `apply(params,
  tokens [B, T], positions [B, T], cache, attention_mask [B, T, T] | None)` returns ([B, T, V]
  logits, cache advanced by T); every new token sees every cache slot below `cache.lengths`, and
  the new tokens see each other as `attention_mask` says (all-true for a diffusion block). Rolling
  back is `cache.replace(lengths=...)`. With a block-causal model (`block_size > 0`) the cached
  result equals `denoise` exactly; with a bidirectional one it is an approximation.
  """

  def init_cache(self, batch: int, max_len: int | None = None) -> Any: ...

  def apply(self, params: Any, tokens: jax.Array, positions: jax.Array, cache: Any,
            attention_mask: jax.Array | None = None) -> tuple[jax.Array, Any]: ...


class AnySubsetModel(Protocol):
  """An any-subset autoregressive model (AS-ARM). Implementations must be hashable.

  Attributes:
    vocab_size, max_len, mask_id: as for `Denoiser`.
  """

  vocab_size: int
  max_len: int
  mask_id: int

  def conditionals(self, params: Any, tokens: jax.Array, ranks: jax.Array) -> jax.Array:
    """Conditionals under a partial order, in one pass.

    Args:
      tokens: [B, T] int32; positions with rank -1 are visible context, the others hold proposed
        tokens (their values matter only to positions of higher rank).
      ranks: [B, T] int32; -1 for visible positions, r >= 0 for a position generated r-th.
    Returns:
      [B, T, V] float32 logits; at a position i with ranks[i] >= 0 they are
      log p(x_i | x_j for all j with ranks[j] < ranks[i]) (visible positions included). Positions
      of equal rank do not see each other, so all-zero ranks on the masked positions give the
      independent per-position predictions and ranks 0..g-1 give the exact joint of a proposal
      under that order. Logits at visible positions are unspecified.
    """


class FinalityDenoiser(Denoiser, Protocol):
  """Optional: a denoiser with a learned unmasking policy (Learn2PD, Bao et al. 2025), met by
  `models.learn2pd.Learn2PD` (model kind "learn2pd"). Implementations must be hashable.

  The finality head predicts, per position, whether the denoiser's current argmax there already
  equals the token greedy decoding would end with; a "learned" rule commits every masked position
  whose sigmoid(finality) passes a threshold (at least the most confident one, for progress). The
  end-of-text stop (EoTP) is the sampler's part: a row is finished as soon as an end-of-text token
  is committed and every position before it is committed.
  """

  def denoise_with_finality(self, params: Any, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """tokens [B, T] int32 -> ([B, T, V] float32 logits exactly as `denoise`, [B, T] float32
    finality logits), in one pass. Finality at unmasked positions is unspecified."""

"""The model section of an experiment: one frozen dataclass shared by every model family.

It lives in `models/` (not `paxlike/`) so that models stay importable without the framework;
`paxlike.config` uses it as the `model` section of the experiment schema.
"""

from __future__ import annotations

import dataclasses

from parallelism.sequence_attention import VARIANTS

DTYPES = ("float32", "bfloat16")
ATTENTION = ("dense",) + VARIANTS
KINDS = ("llama",)  # extend with models.build._KINDS


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and numerics of a Llama-style decoder.

  Attributes:
    kind: model family; "llama" is the causal decoder.
    vocab_size: number of token ids (the byte tokenizer uses 260).
    num_layers: transformer blocks.
    d_model: residual width.
    num_heads: query heads.
    num_kv_heads: key/value heads (grouped-query attention); must divide num_heads.
    head_dim: per-head width; 0 means d_model // num_heads.
    mlp_dim: hidden width of the SwiGLU MLP.
    max_len: longest sequence (prompt + generation) the model and its KV cache accept.
    rope_theta: rotary embedding base.
    norm_eps: RMSNorm epsilon.
    tie_embeddings: reuse the token embedding as the output projection.
    dtype: compute dtype ("float32" or "bfloat16"); parameters are always float32.
    init_std: standard deviation of the normal initialisers.
    attention: implementation of the cache-free causal attention (training, eval, prefill):
      "dense", or a sequence-parallel variant over the mesh's 'sequence' axis: "ring",
      "allgather" or "ulysses" (see `parallelism.sequence_attention`). Cached decode steps are
      always dense.
  """

  kind: str = "llama"
  vocab_size: int = 260
  num_layers: int = 2
  d_model: int = 64
  num_heads: int = 4
  num_kv_heads: int = 4
  head_dim: int = 0
  mlp_dim: int = 128
  max_len: int = 256
  rope_theta: float = 10000.0
  norm_eps: float = 1e-5
  tie_embeddings: bool = True
  dtype: str = "float32"
  init_std: float = 0.02
  attention: str = "dense"

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim or self.d_model // self.num_heads

  def validate(self) -> None:
    """Raises ValueError naming the first inconsistent field and what would be valid."""
    if self.kind not in KINDS:
      raise ValueError(f"model.kind={self.kind!r} is unknown; valid kinds: {', '.join(KINDS)}")
    for name in ("vocab_size", "num_layers", "d_model", "num_heads", "num_kv_heads", "mlp_dim", "max_len"):
      if getattr(self, name) <= 0:
        raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"model.num_kv_heads={self.num_kv_heads} must divide model.num_heads={self.num_heads}")
    if not self.head_dim and self.d_model % self.num_heads:
      raise ValueError(
          f"model.d_model={self.d_model} is not divisible by model.num_heads={self.num_heads}; "
          "set model.head_dim explicitly")
    if self.resolved_head_dim % 2:
      raise ValueError(f"rotary embeddings need an even head_dim, got {self.resolved_head_dim}")
    if self.dtype not in DTYPES:
      raise ValueError(f"model.dtype={self.dtype!r} is unknown; valid: {', '.join(DTYPES)}")
    if self.attention not in ATTENTION:
      raise ValueError(
          f"model.attention={self.attention!r} is unknown; valid: {', '.join(ATTENTION)}")

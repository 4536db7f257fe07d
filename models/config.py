"""The model section of an experiment: one frozen dataclass shared by every model family.

It lives in `models/` (not `paxlike/`) so that models stay importable without the framework;
`paxlike.config` uses it as the `model` section of the experiment schema.
"""

from __future__ import annotations

import dataclasses

from parallelism.sequence_attention import VARIANTS

DIFFUSION_MIN_T = 1e-3  # default lower end of MDLM training times (see `diffusion_min_t`)

DTYPES = ("float32", "bfloat16")
ATTENTION = ("dense",) + VARIANTS
KINDS = ("llama", "mdlm", "asarm", "learn2pd")  # extend with models.build._KINDS
DIFFUSION_SCHEDULES = ("loglinear", "cosine")
ROPE_SCALINGS = ("none", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and numerics of a Llama-style decoder.

  Attributes:
    kind: model family: "llama" the causal decoder; "mdlm" a masked-diffusion denoiser
      (`models.diffusion`); "asarm" an any-subset autoregressive model (`models.asarm`);
      "learn2pd" an mdlm denoiser with a learned unmasking-policy head (`models.learn2pd`).
    vocab_size: number of token ids (the byte tokenizer uses 260).
    num_layers: transformer blocks.
    d_model: residual width.
    num_heads: query heads.
    num_kv_heads: key/value heads (grouped-query attention); must divide num_heads.
    head_dim: per-head width; 0 means d_model // num_heads.
    mlp_dim: hidden width of the SwiGLU MLP.
    max_len: longest sequence (prompt + generation) the model and its KV cache accept.
    rope_theta: rotary embedding base.
    rope_scaling: how rotary frequencies are stretched for long contexts, as in Hugging Face
      Llama: "none"; "linear" (every frequency divided by rope_factor); "llama3" (low
      frequencies divided by rope_factor, high ones kept, a smooth ramp between, set by
      rope_low_freq_factor, rope_high_freq_factor and rope_original_max_len).
    norm_eps: RMSNorm epsilon.
    tie_embeddings: reuse the token embedding as the output projection.
    dtype: compute dtype ("float32" or "bfloat16"); parameters are always float32.
    init_std: standard deviation of the normal initialisers.
    attention: implementation of the cache-free causal attention (training, eval, prefill):
      "dense", or a sequence-parallel variant over the mesh's 'sequence' axis: "ring",
      "allgather" or "ulysses" (see `parallelism.sequence_attention`). Cached decode steps are
      always dense.
    parscale_streams: P parallel streams of the model (ParScale, `models/parscale.py`); they
      share every weight, differ by learnable per-layer key/value prefixes and are combined by a
      learned dynamic aggregation before the output head. 1 = no ParScale.
    parscale_prefix_len: prefix slots per layer and stream (0 = none; needed when P > 1).
    parscale_smoothing: eps of the aggregation weights, (1 - eps) * w + eps / P.
    mask_id: the mask token of "mdlm", "asarm" and "learn2pd" (the byte tokenizer's MASK, 259).
    block_size: "mdlm"/"learn2pd" attention: 0 bidirectional; B > 0 block-causal (a position sees
      its own block of B positions and every earlier block; trained as block diffusion). Must
      divide max_len.
    diffusion_schedule: the masking schedule alpha_t of "mdlm"/"learn2pd": "loglinear"
      (alpha_t = 1 - t) or "cosine" (alpha_t = cos(pi t / 2)).
    diffusion_min_t: "mdlm" training draws t from (diffusion_min_t, 1]. The default, 1e-3, keeps
      the loss the continuous-time ELBO bar the rare, heavily weighted t near 0. A student for
      few-call decoding raises it (0.9: responses nearly all masked, the state one-call
      unmasking starts from) and trades the bound for more training on that state.
    diffusion_min_t_rows: the fraction of each training batch's rows (interleaved) whose t comes
      from (diffusion_min_t, 1]; the others draw from the default (1e-3, 1]. Below 1, a student
      trains on nearly fully masked responses without forgetting the partly masked states that
      its later calls see.
    response_after: "mdlm"/"asarm"/"learn2pd" conditional training (`models.conditioning`): one
      ASCII character; on each line the tokens after it are the response, the only ones noised,
      ordered or generated in training; the rest is the always-clean prompt. "" trains the
      unconditional model of whole sequences.
    finality_dim: hidden width of the "learn2pd" filter head.
    finality_steps: greedy decoding steps of the "learn2pd" training trajectories.
    acceptance_head: a "llama" draft with a SpecDec++ acceptance head
      (`models.acceptance_head`), trained against a target and used by the adaptive sampler's
      rule "head" to stop drafting.
    init_from: a Hugging Face Llama checkpoint directory (config.json + *.safetensors) whose
      weights initialise the model; its config.json decides the shape fields (see
      `paxlike.interchange`). "" means random initialisation.
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
  rope_scaling: str = "none"
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_len: int = 8192
  norm_eps: float = 1e-5
  tie_embeddings: bool = True
  dtype: str = "float32"
  init_std: float = 0.02
  attention: str = "dense"
  parscale_streams: int = 1
  parscale_prefix_len: int = 0
  parscale_smoothing: float = 0.01
  init_from: str = ""
  mask_id: int = 259
  block_size: int = 0
  diffusion_schedule: str = "loglinear"
  diffusion_min_t: float = DIFFUSION_MIN_T
  diffusion_min_t_rows: float = 1.0
  response_after: str = ""
  finality_dim: int = 64
  finality_steps: int = 8
  acceptance_head: bool = False

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
    if self.rope_scaling not in ROPE_SCALINGS:
      raise ValueError(f"model.rope_scaling={self.rope_scaling!r} is unknown; valid: "
                       f"{', '.join(ROPE_SCALINGS)}")
    if self.rope_scaling != "none" and self.rope_factor <= 0:
      raise ValueError(f"model.rope_factor must be positive, got {self.rope_factor}")
    if self.rope_scaling == "llama3" and self.rope_high_freq_factor <= self.rope_low_freq_factor:
      raise ValueError(f"model.rope_high_freq_factor={self.rope_high_freq_factor} must exceed "
                       f"model.rope_low_freq_factor={self.rope_low_freq_factor}")
    if self.dtype not in DTYPES:
      raise ValueError(f"model.dtype={self.dtype!r} is unknown; valid: {', '.join(DTYPES)}")
    if self.attention not in ATTENTION:
      raise ValueError(
          f"model.attention={self.attention!r} is unknown; valid: {', '.join(ATTENTION)}")
    self._validate_parscale()
    self._validate_diffusion()
    if self.acceptance_head and (self.kind != "llama" or self.parscale_streams > 1):
      raise ValueError(f"model.acceptance_head=true needs a plain causal draft "
                       f"(model.kind='llama', model.parscale_streams=1), got kind {self.kind!r} "
                       f"with {self.parscale_streams} streams")

  def _validate_diffusion(self) -> None:
    if self.kind in ("mdlm", "asarm", "learn2pd") and not 0 <= self.mask_id < self.vocab_size:
      raise ValueError(f"model.mask_id={self.mask_id} is not a token id of model.vocab_size="
                       f"{self.vocab_size}; the byte tokenizer's mask is 259 (vocab 260)")
    if self.diffusion_schedule not in DIFFUSION_SCHEDULES:
      raise ValueError(f"model.diffusion_schedule={self.diffusion_schedule!r} is unknown; valid: "
                       f"{', '.join(DIFFUSION_SCHEDULES)}")
    if not 0 <= self.diffusion_min_t < 1:
      raise ValueError(f"model.diffusion_min_t={self.diffusion_min_t} must be in [0, 1): training "
                       f"draws t from (diffusion_min_t, 1]")
    if not 0 <= self.diffusion_min_t_rows <= 1:
      raise ValueError(f"model.diffusion_min_t_rows={self.diffusion_min_t_rows} must be in [0, 1]: "
                       f"the fraction of rows whose t comes from (diffusion_min_t, 1]")
    if self.block_size < 0 or (self.block_size and self.max_len % self.block_size):
      raise ValueError(f"model.block_size={self.block_size} must be 0 (bidirectional) or a "
                       f"positive divisor of model.max_len={self.max_len}")
    if self.block_size and self.kind not in ("mdlm", "learn2pd"):
      raise ValueError(f"model.block_size={self.block_size} applies to kinds mdlm and learn2pd, "
                       f"not {self.kind!r}; set it to 0")
    if self.kind in ("mdlm", "asarm", "learn2pd") and self.attention != "dense":
      raise ValueError(f"model.kind={self.kind!r} needs model.attention='dense' (its masks are "
                       f"not causal), got {self.attention!r}")
    if self.response_after and (len(self.response_after) != 1 or not self.response_after.isascii()
                                or self.response_after == "\n"):
      raise ValueError(f"model.response_after={self.response_after!r} must be one ASCII character "
                       "other than a newline (the prompt/response separator, e.g. '='), or ''")
    if self.response_after and self.kind not in ("mdlm", "asarm", "learn2pd"):
      raise ValueError(f"model.response_after applies to kinds mdlm, asarm and learn2pd, not "
                       f"{self.kind!r}; set it to ''")
    if self.kind == "learn2pd" and (self.finality_dim < 1 or self.finality_steps < 1):
      raise ValueError(f"model.finality_dim and model.finality_steps must be >= 1, got "
                       f"{self.finality_dim} and {self.finality_steps}")

  def _validate_parscale(self) -> None:
    if self.parscale_streams < 1:
      raise ValueError(f"model.parscale_streams must be >= 1 (1 = no ParScale), "
                       f"got {self.parscale_streams}")
    if self.parscale_prefix_len < 0:
      raise ValueError(f"model.parscale_prefix_len must be >= 0, got {self.parscale_prefix_len}")
    if (self.parscale_streams > 1 or self.parscale_prefix_len) and self.kind != "llama":
      raise ValueError(f"ParScale (model.parscale_*) is a llama option; model.kind={self.kind!r}")
    if self.parscale_streams > 1 and not self.parscale_prefix_len:
      raise ValueError(f"model.parscale_streams={self.parscale_streams} needs "
                       "model.parscale_prefix_len >= 1: the streams differ only by their prefixes")
    if not 0.0 <= self.parscale_smoothing <= 1.0:
      raise ValueError(f"model.parscale_smoothing must be in [0, 1], got {self.parscale_smoothing}")
    if self.parscale_prefix_len and self.attention != "dense":
      raise ValueError(f"model.parscale_prefix_len > 0 needs model.attention='dense', got "
                       f"{self.attention!r}")

"""The model section of an experiment: one frozen dataclass shared by every model family.

It lives in `models/` (not `paxlike/`) so that models stay importable without the framework;
`paxlike.config` uses it as the `model` section of the experiment schema. Settings of one model
family live in a nested section of it: `model.parscale.*` (ParScale streams of a llama),
`model.diffusion.*` (the masked-diffusion kinds) and `model.finality.*` (Learn2PD's filter head).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from parallelism.sequence_attention import VARIANTS

DIFFUSION_MIN_T = 1e-3  # default lower end of MDLM training times (see `DiffusionConfig.min_t`)

DTYPES = ("float32", "bfloat16")
ATTENTION = ("dense",) + VARIANTS
KINDS = ("llama", "mdlm", "asarm", "learn2pd")  # extend with models.build._KINDS
DENOISER_KINDS = ("mdlm", "asarm", "learn2pd")  # the kinds with a mask token
DIFFUSION_SCHEDULES = ("loglinear", "cosine")
ROPE_SCALINGS = ("none", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class ParScaleConfig:
  """ParScale (`models/parscale.py`) of a "llama" model: `model.parscale.*`.

  Attributes:
    streams: P parallel streams of the model; they share every weight, differ by learnable
      per-layer key/value prefixes and are combined by a learned dynamic aggregation before the
      output head. 1 = no ParScale.
    prefix_len: prefix slots per layer and stream (0 = none; needed when P > 1).
    smoothing: eps of the aggregation weights, (1 - eps) * w + eps / P.
  """

  streams: int = 1
  prefix_len: int = 0
  smoothing: float = 0.01

  def validate(self) -> None:
    """Raises ValueError naming the first invalid field (`ModelConfig` checks the kind)."""
    if self.streams < 1:
      raise ValueError(f"model.parscale.streams must be >= 1 (1 = no ParScale), got {self.streams}")
    if self.prefix_len < 0:
      raise ValueError(f"model.parscale.prefix_len must be >= 0, got {self.prefix_len}")
    if self.streams > 1 and not self.prefix_len:
      raise ValueError(f"model.parscale.streams={self.streams} needs model.parscale.prefix_len "
                       ">= 1: the streams differ only by their prefixes")
    if not 0.0 <= self.smoothing <= 1.0:
      raise ValueError(f"model.parscale.smoothing must be in [0, 1], got {self.smoothing}")


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
  """The masked-diffusion kinds "mdlm", "asarm" and "learn2pd": `model.diffusion.*`.

  Attributes:
    mask_id: the mask token (the byte tokenizer's MASK, 259).
    block_size: "mdlm"/"learn2pd" attention: 0 bidirectional; B > 0 block-causal (a position sees
      its own block of B positions and every earlier block; trained as block diffusion). Must
      divide model.max_len.
    schedule: the masking schedule alpha_t of "mdlm"/"learn2pd": "loglinear" (alpha_t = 1 - t)
      or "cosine" (alpha_t = cos(pi t / 2)).
    min_t: "mdlm" training draws t from (min_t, 1]. The default, 1e-3, keeps the loss the
      continuous-time ELBO bar the rare, heavily weighted t near 0. A student for few-call
      decoding raises it (0.9: responses nearly all masked, the state one-call unmasking starts
      from) and trades the bound for more training on that state.
    min_t_rows: the fraction of each training batch's rows (interleaved) whose t comes from
      (min_t, 1]; the others draw from the default (1e-3, 1]. Below 1, a student trains on nearly
      fully masked responses without forgetting the partly masked states that its later calls see.
    certainty_weight: "mdlm" training adds this times dParallel's certainty-forcing term
      (`models.diffusion.certainty`: the entropy at the masked positions already predicted
      correctly) to the ELBO; trained on the model's own answers (a self-distilled student) it
      makes them confident enough to be unmasked in parallel. 0 (default): the ELBO alone.
    response_after: conditional training (`models.conditioning`): one ASCII character; on each
      line the tokens after it are the response, the only ones noised, ordered or generated in
      training; the rest is the always-clean prompt. "" trains the unconditional model of whole
      sequences.
  """

  mask_id: int = 259
  block_size: int = 0
  schedule: str = "loglinear"
  min_t: float = DIFFUSION_MIN_T
  min_t_rows: float = 1.0
  certainty_weight: float = 0.0
  response_after: str = ""

  def validate(self) -> None:
    """Raises ValueError naming the first invalid field (`ModelConfig` checks the kind, the
    mask id against the vocabulary and the block size against max_len)."""
    if self.schedule not in DIFFUSION_SCHEDULES:
      raise ValueError(f"model.diffusion.schedule={self.schedule!r} is unknown; valid: "
                       f"{', '.join(DIFFUSION_SCHEDULES)}")
    if not 0 <= self.min_t < 1:
      raise ValueError(f"model.diffusion.min_t={self.min_t} must be in [0, 1): training draws t "
                       f"from (min_t, 1]")
    if not 0 <= self.min_t_rows <= 1:
      raise ValueError(f"model.diffusion.min_t_rows={self.min_t_rows} must be in [0, 1]: the "
                       f"fraction of rows whose t comes from (min_t, 1]")
    if self.certainty_weight < 0:
      raise ValueError(f"model.diffusion.certainty_weight={self.certainty_weight} must be >= 0 "
                       f"(0: the ELBO alone)")
    if self.block_size < 0:
      raise ValueError(f"model.diffusion.block_size={self.block_size} must be 0 (bidirectional) "
                       "or a positive divisor of model.max_len")
    if self.response_after and (len(self.response_after) != 1 or not self.response_after.isascii()
                                or self.response_after == "\n"):
      raise ValueError(f"model.diffusion.response_after={self.response_after!r} must be one ASCII "
                       "character other than a newline (the prompt/response separator, e.g. "
                       "'='), or ''")


@dataclasses.dataclass(frozen=True)
class FinalityConfig:
  """The learned unmasking policy of a "learn2pd" model (`models.learn2pd`): `model.finality.*`.

  Attributes:
    dim: hidden width of the filter head.
    steps: greedy decoding steps of the training trajectories.
  """

  dim: int = 64
  steps: int = 8

  def validate(self) -> None:
    """Raises ValueError unless both fields are >= 1 (checked for kind "learn2pd" only)."""
    if self.dim < 1 or self.steps < 1:
      raise ValueError(f"model.finality.dim and model.finality.steps must be >= 1, got "
                       f"{self.dim} and {self.steps}")


@dataclasses.dataclass(frozen=True)
class DraftHeadsConfig:
  """Heads a "llama" model carries for drafting (`model.draft_heads.*`); the model's own weights
  are frozen while they train (`train.trainable`).

  Attributes:
    acceptance: a SpecDec++ acceptance head (`models.acceptance_head`) on a draft, used by the
      adaptive sampler's rule "head" to stop drafting.
    medusa: K >= 0 Medusa heads on a target (`models.medusa`), head k predicting the token k + 1
      places past the next one; the `medusa` sampler drafts a token tree from them.
    eagle: an EAGLE draft head on a target (`models.eagle`): one decoder block over the target's
      features; the `eagle` sampler drafts with it.
    eagle_mlp_dim: the head block's MLP width; 0 means the target's `mlp_dim` (the paper's). A
      narrower one drafts faster where weight reads dominate a call (a CPU at batch 1).
    eagle_rollout: training-time test steps (EAGLE-3): the head also learns from pairs whose
      features are its own predictions, up to this many steps ahead; 1 is EAGLE-1's training.
  """

  acceptance: bool = False
  medusa: int = 0
  eagle: bool = False
  eagle_mlp_dim: int = 0
  eagle_rollout: int = 1

  def validate(self, kind: str, streams: int) -> None:
    """ValueError unless the heads sit on a plain causal model (kind "llama", one stream)."""
    if self.medusa < 0:
      raise ValueError(f"model.draft_heads.medusa must be >= 0 heads, got {self.medusa}")
    if self.eagle_rollout < 1:
      raise ValueError(f"model.draft_heads.eagle_rollout must be >= 1 step, got "
                       f"{self.eagle_rollout}")
    if self.eagle_mlp_dim < 0:
      raise ValueError(f"model.draft_heads.eagle_mlp_dim must be >= 0 (0: the target's mlp_dim), "
                       f"got {self.eagle_mlp_dim}")
    if sum([self.acceptance, self.medusa > 0, self.eagle]) > 1:
      raise ValueError("model.draft_heads: set one of acceptance (a draft's head), medusa or eagle "
                       "(a target's heads), not several")
    if (self.acceptance or self.medusa or self.eagle) and (kind != "llama" or streams > 1):
      raise ValueError(f"model.draft_heads needs a plain causal model (model.kind='llama', "
                       f"model.parscale.streams=1), got kind {kind!r} with {streams} streams")


# Flat field names of configs stored before the family sections: old name -> (section, field).
LEGACY_FIELDS = {
    "parscale_streams": ("parscale", "streams"),
    "parscale_prefix_len": ("parscale", "prefix_len"),
    "parscale_smoothing": ("parscale", "smoothing"),
    "mask_id": ("diffusion", "mask_id"),
    "block_size": ("diffusion", "block_size"),
    "diffusion_schedule": ("diffusion", "schedule"),
    "diffusion_min_t": ("diffusion", "min_t"),
    "diffusion_min_t_rows": ("diffusion", "min_t_rows"),
    "response_after": ("diffusion", "response_after"),
    "finality_dim": ("finality", "dim"),
    "finality_steps": ("finality", "steps"),
    "acceptance_head": ("draft_heads", "acceptance"),
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and numerics of a Llama-style decoder, with one section per model family.

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
    parscale: ParScale streams of a "llama" model (`ParScaleConfig`).
    init_from: a Hugging Face Llama checkpoint directory (config.json + *.safetensors) whose
      weights initialise the model; its config.json decides the shape fields (see
      `paxlike.interchange`). "" means random initialisation.
    diffusion: mask token, attention blocks, masking schedule and conditioning of "mdlm",
      "asarm" and "learn2pd" (`DiffusionConfig`).
    finality: the filter head and training trajectories of "learn2pd" (`FinalityConfig`).
    draft_heads: heads for drafting on a "llama" model: a SpecDec++ acceptance head on a draft
      or Medusa heads on a target (`DraftHeadsConfig`).
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
  parscale: ParScaleConfig = ParScaleConfig()
  init_from: str = ""
  diffusion: DiffusionConfig = DiffusionConfig()
  finality: FinalityConfig = FinalityConfig()
  draft_heads: DraftHeadsConfig = DraftHeadsConfig()

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim or self.d_model // self.num_heads

  @staticmethod
  def upgrade_legacy(data: dict[str, Any]) -> dict[str, Any]:
    """A stored model dict with the flat family fields of older configs (`parscale_streams`,
    `mask_id`, `diffusion_schedule`, `finality_dim`, ... see LEGACY_FIELDS) moved into their
    sections; `data` itself is returned when it has none. Called by `paxlike.config.from_dict`."""
    if not any(name in data for name in LEGACY_FIELDS):
      return data
    data = dict(data)
    for old, (section, name) in LEGACY_FIELDS.items():
      if old not in data:
        continue
      value = data.pop(old)
      fields = dict(data.get(section) or {})
      if name in fields and fields[name] != value:
        raise ValueError(f"stored model config sets both {old}={value!r} (old layout) and "
                         f"{section}.{name}={fields[name]!r}; keep one")
      fields[name] = value
      data[section] = fields
    return data

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
    if self.kind == "learn2pd":
      self.finality.validate()
    self.draft_heads.validate(self.kind, self.parscale.streams)

  def _validate_diffusion(self) -> None:
    """The diffusion section against the kind, vocabulary, max_len and attention."""
    diffusion = self.diffusion
    if self.kind in DENOISER_KINDS and not 0 <= diffusion.mask_id < self.vocab_size:
      raise ValueError(f"model.diffusion.mask_id={diffusion.mask_id} is not a token id of "
                       f"model.vocab_size={self.vocab_size}; the byte tokenizer's mask is 259 "
                       "(vocab 260)")
    diffusion.validate()
    if diffusion.block_size and self.max_len % diffusion.block_size:
      raise ValueError(f"model.diffusion.block_size={diffusion.block_size} must be 0 "
                       f"(bidirectional) or a positive divisor of model.max_len={self.max_len}")
    if diffusion.block_size and self.kind not in ("mdlm", "learn2pd"):
      raise ValueError(f"model.diffusion.block_size={diffusion.block_size} applies to kinds mdlm "
                       f"and learn2pd, not {self.kind!r}; set it to 0")
    if diffusion.certainty_weight and self.kind != "mdlm":
      raise ValueError(f"model.diffusion.certainty_weight={diffusion.certainty_weight} is a term "
                       f"of the mdlm loss, not of kind {self.kind!r}; set it to 0")
    if self.kind in DENOISER_KINDS and self.attention != "dense":
      raise ValueError(f"model.kind={self.kind!r} needs model.attention='dense' (its masks are "
                       f"not causal), got {self.attention!r}")
    if diffusion.response_after and self.kind not in DENOISER_KINDS:
      raise ValueError(f"model.diffusion.response_after applies to kinds mdlm, asarm and "
                       f"learn2pd, not {self.kind!r}; set it to ''")

  def _validate_parscale(self) -> None:
    """The parscale section against the kind and attention."""
    parscale = self.parscale
    parscale.validate()
    if (parscale.streams > 1 or parscale.prefix_len) and self.kind != "llama":
      raise ValueError(f"ParScale (model.parscale.*) is a llama option; model.kind={self.kind!r}")
    if parscale.prefix_len and self.attention != "dense":
      raise ValueError(f"model.parscale.prefix_len > 0 needs model.attention='dense', got "
                       f"{self.attention!r}")

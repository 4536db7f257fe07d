"""Typed experiment configs: frozen dataclass sections, `--set a.b=value` overrides, JSON, diffs.

An `Experiment` is a tree of frozen dataclasses. Overrides are parsed to the type of the field they
name; unknown keys and wrong types raise `UserError` naming the key and the nearest valid ones.
"""

from __future__ import annotations

import dataclasses
import re
import difflib
import json
import types
import typing
from typing import Any, Mapping, Sequence

from models import consistency
from models.config import ModelConfig
from paxlike import sampler_section
from paxlike.errors import UserError
from paxlike.sampler_section import SELECTIONS, SamplerConfig  # noqa: F401 (the section's home)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Training text and how it is cut into sequences.

  Attributes:
    path: a file, directory or glob of UTF-8 text files; "" means the default corpus (the running
      Python's standard-library `.py` sources).
    seq_len: tokens per training sequence (packed, no padding).
    eval_fraction: share of the corpus held out for evaluation (by file, or the stream's tail when
      the corpus is a single file).
  """

  path: str = ""
  seq_len: int = 128
  eval_fraction: float = 0.05


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """AdamW with global-norm gradient clipping (optax)."""

  learning_rate: float = 3e-3
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  clip_norm: float = 1.0


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
  """Learning-rate schedule over `train.steps`.

  Attributes:
    kind: "cosine" (linear warmup + cosine decay), "wsd" (warmup-stable-decay with a linear
      cool-down over the last `decay_fraction` of training) or "constant" (after warmup).
    warmup_steps: linear warmup length.
    decay_fraction: share of training spent in the final decay ("wsd" only).
    min_lr_ratio: final learning rate as a fraction of the peak.
  """

  kind: str = "cosine"
  warmup_steps: int = 20
  decay_fraction: float = 0.2
  min_lr_ratio: float = 0.1


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh over axes ('data', 'fsdp', 'sequence', 'tensor'); -1 fills the remaining devices.

  `dcn_<axis>` says how many entries of that axis lie across slices / hosts (the slow network):
  e.g. 2 TPU slices with data parallelism between them: `mesh.dcn_data=2`.
  """

  data: int = -1
  fsdp: int = 1
  sequence: int = 1
  tensor: int = 1
  dcn_data: int = 1
  dcn_fsdp: int = 1
  dcn_sequence: int = 1
  dcn_tensor: int = 1


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """Orbax checkpointing: save every N steps (asynchronously), keep the last K."""

  every_steps: int = 100
  keep: int = 3
  async_save: bool = True


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """The training loop: global batch, step count and the seed of everything random.

  Attributes:
    teacher_workdir: a trained run whose model this one is distilled from (e.g. a draft model
      for speculative decoding): the loss becomes (1 - distill_weight) * cross-entropy +
      distill_weight * KL(teacher || student). "" trains on the data alone.
    init_from: a trained paxlike workdir to start from: at step 0 every parameter whose path and
      shape match one in its latest checkpoint is copied; the others (e.g. a new head) keep their
      fresh initialisation. "" starts from scratch. Ignored when resuming.
    trainable: a regular expression over '/'-joined parameter paths (e.g.
      "acceptance_head|parscale"); parameters it does not match (re.search) are frozen: zero
      updates, no weight decay, not counted in the clipped gradient norm. "" trains everything.
    microbatches: gradient accumulation: each step's batch_size rows are processed as this many
      microbatches of batch_size / microbatches rows, their gradients averaged before the one
      optimizer update (a batch whose activations do not fit). 1 processes the batch at once.
    remat: what each transformer block keeps for the backward pass: "none" (everything),
      "dots" (its projections' outputs; attention and elementwise ops are recomputed) or "full"
      (only its input; the block's forward runs again). Less activation memory, more compute;
      the same gradients.
    consistency_block: n > 0 trains for Jacobi decoding of blocks of n with CLLM's consistency
      objective (`models.consistency`): the teacher (train.teacher_workdir, the frozen target)
      Jacobi-iterates the block after each window's first seq_len + 1 - n tokens, and the model
      learns to predict the fixed point from any state of that trajectory, plus the fixed point's
      next-token cross-entropy. Start from the target (train.init_from). 0 trains as usual.
    consistency_ar_weight: the weight of that next-token term beside the consistency term.
  """

  steps: int = 200
  seed: int = 0
  batch_size: int = 8
  teacher_workdir: str = ""
  distill_weight: float = 1.0
  init_from: str = ""
  trainable: str = ""
  microbatches: int = 1
  remat: str = "none"
  consistency_block: int = 0
  consistency_ar_weight: float = 1.0


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Held-out evaluation: every N steps (0 = only at the end), over a fixed number of batches."""

  every_steps: int = 100
  batches: int = 8


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """How a run behaves rather than what it computes.

  Attributes:
    log_every: print a progress line (and write metrics) every N steps.
    allow_config_change: let a restart in an existing workdir change model/data/optimizer fields.
    sample_after_train: print a generated sample when training ends.
  """

  log_every: int = 10
  allow_config_change: bool = False
  sample_after_train: bool = True


@dataclasses.dataclass(frozen=True)
class Experiment:
  """A complete, resolved experiment: every section of the schema."""

  name: str = "unnamed"
  model: ModelConfig = ModelConfig()
  data: DataConfig = DataConfig()
  optimizer: OptimizerConfig = OptimizerConfig()
  schedule: ScheduleConfig = ScheduleConfig()
  mesh: MeshConfig = MeshConfig()
  checkpoint: CheckpointConfig = CheckpointConfig()
  train: TrainConfig = TrainConfig()
  eval: EvalConfig = EvalConfig()
  sampler: SamplerConfig = SamplerConfig()
  run: RunConfig = RunConfig()


# Sections (or single fields) that define the trained model; a restart may not change them silently.
TRAINING_IDENTITY = ("model", "data", "optimizer", "schedule", "train.seed", "train.batch_size",
                     "train.distill_weight", "train.init_from", "train.trainable")
# What sampling and eval from a workdir may change freely.
SAMPLE_MUTABLE = ("sampler", "eval", "run", "mesh", "checkpoint")

_SCHEDULE_KINDS = ("cosine", "wsd", "constant")
_REMAT = ("none", "dots", "full")  # models.llama.REMAT_POLICIES and none
# The range of every numeric field outside the model and sampler sections (which check their own):
# key -> (is the value valid, what a valid value is).
_RANGES: dict[str, tuple[Any, str]] = {
    "data.seq_len": (lambda v: v > 0, "> 0"),
    "data.eval_fraction": (lambda v: 0 < v < 1, "in (0, 1)"),
    "optimizer.learning_rate": (lambda v: v > 0, "> 0"),
    "optimizer.b1": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "optimizer.b2": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "optimizer.eps": (lambda v: v > 0, "> 0"),
    "optimizer.weight_decay": (lambda v: v >= 0, ">= 0"),
    "optimizer.clip_norm": (lambda v: v > 0, "> 0"),
    "schedule.warmup_steps": (lambda v: v >= 0, ">= 0"),
    "schedule.decay_fraction": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "schedule.min_lr_ratio": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    **{f"mesh.{axis}": (lambda v: v == -1 or v >= 1, ">= 1, or -1 for the remaining devices")
       for axis in ("data", "fsdp", "sequence", "tensor")},
    **{f"mesh.dcn_{axis}": (lambda v: v >= 1, ">= 1")
       for axis in ("data", "fsdp", "sequence", "tensor")},
    "checkpoint.every_steps": (lambda v: v > 0, "> 0"),
    "checkpoint.keep": (lambda v: v > 0, "> 0"),
    "train.steps": (lambda v: v >= 0, ">= 0"),
    "train.seed": (lambda v: 0 <= v < 2**32, "in [0, 2**32)"),
    "train.batch_size": (lambda v: v > 0, "> 0"),
    "train.microbatches": (lambda v: v > 0, "> 0"),
    "train.distill_weight": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "eval.every_steps": (lambda v: v >= 0, ">= 0 (0: only at the end)"),
    "eval.batches": (lambda v: v >= 1, ">= 1"),
    "run.log_every": (lambda v: v > 0, "> 0"),
}


def validate(exp: Experiment) -> Experiment:
  """Checks ranges and cross-field consistency; raises UserError naming the field and what a valid
  value is."""
  try:
    exp.model.validate()
    consistency.validate(exp.train, exp.model, exp.data.seq_len)
  except ValueError as e:
    raise UserError(str(e)) from None
  values = flatten(exp)
  for key, (ok, expected) in _RANGES.items():
    if not ok(values[key]):
      raise UserError(f"{key} must be {expected}, got {values[key]}")
  checks = [
      (exp.data.seq_len <= exp.model.max_len,
       f"data.seq_len={exp.data.seq_len} exceeds model.max_len={exp.model.max_len}"),
      (exp.train.remat in _REMAT,
       f"train.remat={exp.train.remat!r} is unknown; valid: {', '.join(_REMAT)}"),
      (exp.schedule.kind in _SCHEDULE_KINDS,
       f"schedule.kind={exp.schedule.kind!r} is unknown; valid: {', '.join(_SCHEDULE_KINDS)}"),
      (not exp.model.draft_heads.acceptance or not exp.train.steps or exp.train.teacher_workdir,
       "model.draft_heads.acceptance=true trains the acceptance head against a target: set "
       "train.teacher_workdir=<the target's run>"),
      (not exp.model.draft_heads.acceptance or not exp.train.steps or exp.train.trainable,
       "model.draft_heads.acceptance=true trains only the head: set train.trainable=acceptance_head "
       "(and train.init_from=<the trained draft's run>) so the draft's weights stay as trained"),
      (not exp.model.draft_heads.medusa or not exp.train.steps or exp.train.trainable,
       "model.draft_heads.medusa trains only the heads: set train.trainable=medusa (and "
       "train.init_from=<the trained target's run>) so the target's weights stay as trained"),
      (not exp.model.draft_heads.eagle or not exp.train.steps or exp.train.trainable,
       "model.draft_heads.eagle=true trains only the head: set train.trainable=eagle (and "
       "train.init_from=<the trained target's run>) so the target's weights stay as trained"),
  ]
  for ok, message in checks:
    if not ok:
      raise UserError(message)
  sampler_section.check(exp.sampler)
  try:
    re.compile(exp.train.trainable)
  except re.error as e:
    raise UserError(f"train.trainable={exp.train.trainable!r} is not a valid regular expression "
                    f"({e}); e.g. 'acceptance_head' or 'parscale|lm_head'") from None
  return exp


# ----------------------------------------------------------------------------- flat views


def to_dict(exp: Any) -> dict[str, Any]:
  """Nested plain dict of a config tree (JSON-serialisable)."""
  return dataclasses.asdict(exp)


def flatten(exp: Any, prefix: str = "") -> dict[str, Any]:
  """{'model.d_model': 64, ...} for every leaf field."""
  out: dict[str, Any] = {}
  for f in dataclasses.fields(exp):
    value = getattr(exp, f.name)
    key = f"{prefix}{f.name}"
    if dataclasses.is_dataclass(value):
      out.update(flatten(value, key + "."))
    else:
      out[key] = value
  return out


def diff(old: Experiment, new: Experiment, keys: Sequence[str] | None = None) -> list[str]:
  """Human-readable lines `key: old -> new` for differing fields (restricted to `keys` prefixes)."""
  a, b = flatten(old), flatten(new)
  lines = []
  for key in sorted(set(a) | set(b)):
    if keys is not None and not any(key == k or key.startswith(k + ".") for k in keys):
      continue
    if a.get(key) != b.get(key):
      lines.append(f"  {key}: {a.get(key)!r} -> {b.get(key)!r}")
  return lines


def to_json(exp: Experiment) -> str:
  return json.dumps(to_dict(exp), indent=2, sort_keys=True)


def from_dict(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
  """Rebuilds a config tree from `to_dict` output; unknown keys raise UserError."""
  tagged = getattr(cls, "tagged_class", None)
  if tagged is not None:  # a tagged union: the stored tag picks the class
    cls = tagged(data)
  upgrade = getattr(cls, "upgrade_legacy", None)
  if upgrade is not None:  # configs stored before a section was reshaped still load
    data = upgrade(dict(data))
  hints = typing.get_type_hints(cls)
  names = {f.name for f in dataclasses.fields(cls)}
  kwargs = {}
  for key, value in data.items():
    if key not in names:
      raise UserError(f"unknown config key {prefix + key!r} in stored config")
    field_type = hints[key]
    if dataclasses.is_dataclass(field_type):
      kwargs[key] = from_dict(field_type, value, f"{prefix}{key}.")
    elif isinstance(value, list):
      kwargs[key] = tuple(value)
    else:
      kwargs[key] = value
  return cls(**kwargs)


# ----------------------------------------------------------------------------- overrides


def _parse_value(key: str, text: str, field_type: Any) -> Any:
  """Parses `text` to `field_type` (bool, int, float, str, tuples and optionals of those)."""
  origin = typing.get_origin(field_type)
  if origin in (typing.Union, types.UnionType):
    options = [t for t in typing.get_args(field_type) if t is not type(None)]
    if text.lower() in ("none", "null") and len(options) < len(typing.get_args(field_type)):
      return None
    return _parse_value(key, text, options[0])
  if origin is tuple:
    item_type = typing.get_args(field_type)[0]
    parts = [p for p in text.split(",") if p.strip()]
    return tuple(_parse_value(key, p.strip(), item_type) for p in parts)
  try:
    if field_type is bool:
      lowered = text.strip().lower()
      if lowered in ("true", "1", "yes", "on"):
        return True
      if lowered in ("false", "0", "no", "off"):
        return False
      raise ValueError
    if field_type is int:
      return int(text)
    if field_type is float:
      return float(text)
    if field_type is str:
      return text
  except ValueError:
    pass
  else:
    raise UserError(f"cannot override {key}: unsupported field type {field_type}")
  type_name = getattr(field_type, "__name__", str(field_type))
  example = {"bool": "true or false", "int": "an integer like 64", "float": "a number like 3e-4"}
  raise UserError(
      f"--set {key}={text!r}: expected {type_name} ({example.get(type_name, type_name)})")


def _replace_path(node: Any, path: list[str], raw: str, full_key: str) -> Any:
  hints = typing.get_type_hints(type(node))
  name = path[0]
  if len(path) == 1:
    return dataclasses.replace(node, **{name: _parse_value(full_key, raw, hints[name])})
  child = getattr(node, name)
  return dataclasses.replace(node, **{name: _replace_path(child, path[1:], raw, full_key)})


def apply_overrides(exp: Experiment, overrides: Sequence[str]) -> Experiment:
  """Applies `a.b=value` strings in order; raises UserError on unknown keys or bad values."""
  for item in overrides:
    if "=" not in item:
      raise UserError(f"--set {item!r} is not of the form section.field=value (e.g. train.steps=100)")
  # The sampler's kind picks its section's fields, so it is set before them.
  kind_first = sorted(overrides, key=lambda item: item.split("=", 1)[0].strip() != "sampler.kind")
  for item in kind_first:
    valid = flatten(exp)
    key, raw = item.split("=", 1)
    key = key.strip()
    if key.startswith("sampler.") and key.count(".") == 1 and key not in valid:
      raise UserError(sampler_section.unknown_setting(exp.sampler, key.split(".")[1]))
    if any(k.startswith(key + ".") for k in valid):
      fields = [k for k in valid if k.startswith(key + ".")][:4]
      raise UserError(f"--set {key}: {key!r} is a section; set one of its fields "
                      f"(e.g. {', '.join(fields)})")
    if key not in valid:
      nearest = difflib.get_close_matches(key, list(valid), n=3, cutoff=0.5)
      if not nearest:
        section = key.split(".")[0]
        nearest = [k for k in valid if k.startswith(section + ".")][:5]
      hint = f"; nearest valid keys: {', '.join(nearest)}" if nearest else (
          f"; sections: {', '.join(sorted({k.split('.')[0] for k in valid}))}")
      raise UserError(f"unknown config key {key!r}{hint}")
    exp = _replace_path(exp, key.split("."), raw, key)
  return exp

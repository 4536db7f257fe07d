"""The experiment's `sampler` section: a tagged union chosen by `kind`.

`SamplerConfig` holds the settings every decode shares (what to decode, how to draw, which
second model, how many samples). Each kind registered in `samplers.registry` adds its own
settings, the fields of its spec's `options` dataclass, to a subclass generated here:
`SamplerConfig(kind="tree", branching=(2, 2, 1))` is a `TreeSamplerConfig`, and on the command line
`--set sampler.kind=tree --set sampler.branching=2,2,1`. A setting of another kind is an error
that names the valid ones. Changing the kind, `dataclasses.replace(cfg, kind="ar")` (or `--set
sampler.kind=...`), keeps the shared settings and those the new kind also has.

Validation lives with each sampler: a section is checked by building the sampler's own config
from it (`check`).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from paxlike.errors import UserError
from samplers import registry
from samplers.core.logits import SamplingParams
from samplers.spec import Decode, SamplerSpec

SELECTIONS = ("none", "best_of_n", "majority", "mbr", "first_finish", "reward_pruned")

# Settings of the flat sampler section of earlier versions: old name -> new name (same kind).
LEGACY_NAMES = {
    "tree_branching": "branching", "tree_children": "children",
    "tree_node_budget": "node_budget", "tree_max_depth": "max_depth",
    "jacobi_block": "block_size", "contrastive_alpha": "alpha",
    "switch_threshold": "threshold", "switch_window": "window",
    "switch_sync_every": "sync_every", "adaptive_rule": "rule",
    "diffusion_steps": "steps", "noise_schedule": "schedule",
    "unmask_rule": "rule", "unmask_confidence": "confidence", "unmask_k": "k",
    "unmask_threshold": "threshold", "unmask_factor": "factor", "unmask_slots": "slots",
    "assd_order": "order", "assd_reuse_drafts": "reuse_drafts",
    "block_cached": "cache", "cached": "cache",  # a bool before the Fast-dLLM caches
}


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """Decoding for `--mode=sample` (and the samples printed after training).

  Attributes:
    kind: a kind of `samplers.registry` (ar, speculative, spectr, tree, dynamic_tree, adaptive,
      jacobi, contrastive, entropy_switch, mdlm, unmask, block, edlm, assd, learned_unmask); its
      own settings are documented on its options class (e.g. `samplers.tree.TreeOptions`).
    max_new_tokens: tokens to generate per prompt at most (shortened to fit the cache).
    temperature, top_k, top_p: how tokens are drawn (temperature 0: greedy).
    seed: the decode's random key.
    prompt: the default prompt.
    draft_workdir: a trained run used as the second model of the kinds that take one (the
      draft, amateur, small or energy model; "" = this workdir's companion `draft/`).
    draft_experiment: a registered experiment trained after this one, by distillation from it,
      as its companion draft in `WORKDIR/draft` ("" = none).
    diffusion_experiment: a registered masked-diffusion experiment trained after this one in
      `WORKDIR/diffusion`, whose parallel decoding is printed beside this model's ("" = none).
    num_samples: n >= 1 samples per prompt (`samplers.repeated`: vmapped, prefill shared).
    selection: how one of the n is picked: "none" (print all n), "best_of_n" (model
      log-likelihood), "majority" (self-consistency), "mbr" (token F1), "first_finish" (the first
      to emit eos) or "reward_pruned" (speculative rejection, pruning every prune_every tokens to
      prune_keep of the survivors); the diffusion kinds take "none", "majority" and "mbr"; see
      `paxlike.parallel_sampling`.
  """

  kind: str = "ar"
  max_new_tokens: int = 128
  temperature: float = 0.8
  top_k: int = 0
  top_p: float = 0.95
  seed: int = 0
  prompt: str = "def "
  draft_workdir: str = ""
  draft_experiment: str = ""
  diffusion_experiment: str = ""
  num_samples: int = 1
  selection: str = "none"
  prune_every: int = 8
  prune_keep: float = 0.5

  def __new__(cls, *args, **kwargs):
    """Picks the class of `kind`; a kind change carries over the settings both kinds have."""
    if args:  # positional construction: only ever the class's own kind
      return object.__new__(cls)
    target = class_of(kwargs.get("kind", getattr(cls, "KIND", "ar")))
    if issubclass(target, cls):  # SamplerConfig(kind=...), or the class of its own kind
      return object.__new__(target)
    own = {f.name for f in dataclasses.fields(cls)} - {f.name for f in dataclasses.fields(target)}
    return target(**{k: v for k, v in kwargs.items() if k not in own})

  def __post_init__(self):
    if type(self) is not class_of(self.kind):
      raise TypeError(f"a {type(self).__name__} cannot hold kind {self.kind!r}")

  @property
  def spec(self) -> SamplerSpec:
    return registry.get(self.kind)

  def options(self) -> Any:
    """This kind's own settings, as its spec's options dataclass."""
    names = [f.name for f in dataclasses.fields(self.spec.options)]
    return self.spec.options(**{name: getattr(self, name) for name in names})

  def sampling(self) -> SamplingParams:
    return SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)

  @staticmethod
  def tagged_class(data: dict[str, Any]) -> type:
    """The class a stored section (`to_dict` output) is read into."""
    return class_of(data.get("kind", "ar"))

  @staticmethod
  def upgrade_legacy(data: dict[str, Any]) -> dict[str, Any]:
    """A section stored by the earlier flat schema (every kind's settings, prefixed), reduced to
    the shared settings and those of its kind under their present names. A block section's
    boolean `cached` (before the Fast-dLLM caches) becomes `cache` "exact" or "none"."""
    if data.get("kind") == "block" and ("cached" in data or "block_cached" in data):
      data = {k: v for k, v in data.items() if k not in ("cached", "block_cached")} | {
          "cache": "exact" if data.get("cached", data.get("block_cached")) else "none"}
    if "unmask_rule" not in data:  # the flat schema always stored it
      return data
    cls = class_of(data.get("kind", "ar"))
    names = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for key, value in data.items():
      key = LEGACY_NAMES.get(key, key)
      if key in names and (key not in out or key in LEGACY_NAMES.values()):
        out[key] = value
    return out


_CLASSES: dict[str, type] = {}


def _class_name(kind: str) -> str:
  return "".join(part.title() for part in kind.split("_")) + "SamplerConfig"


def class_of(kind: str) -> type:
  """The SamplerConfig subclass of `kind` (shared settings + the kind's options)."""
  if kind not in _CLASSES:
    try:
      spec = registry.get(kind)
    except ValueError as e:
      raise UserError(str(e)) from None
    hints = typing.get_type_hints(spec.options)
    fields = [(f.name, hints[f.name], dataclasses.field(default=f.default))
              for f in dataclasses.fields(spec.options)]
    cls = dataclasses.make_dataclass(_class_name(kind), fields, bases=(SamplerConfig,),
                                     frozen=True, namespace={"KIND": kind})
    cls.__module__ = __name__
    cls.__doc__ = (f"The sampler section of kind {kind!r}: `SamplerConfig`'s settings and those "
                   f"of `{spec.options.__module__}.{spec.options.__name__}`.")
    globals()[cls.__name__] = cls  # picklable by name
    _CLASSES[kind] = cls
  return _CLASSES[kind]


def settings_of(kind: str) -> list[str]:
  """The field names of kind's section (shared settings first)."""
  return [f.name for f in dataclasses.fields(class_of(kind))]


def unknown_setting(cfg: SamplerConfig, name: str) -> str:
  """The error message for `--set sampler.<name>=...` that this kind does not have."""
  if name in LEGACY_NAMES:
    return (f"sampler.{name} is now sampler.{LEGACY_NAMES[name]} (for the kinds that have it: "
            f"{', '.join(registry.kinds_with(LEGACY_NAMES[name])) or 'none'})")
  owners = registry.kinds_with(name)
  own = [f.name for f in dataclasses.fields(cfg.spec.options)]
  where = (f"it is a setting of sampler.kind={' / '.join(owners)}; add --set "
           f"sampler.kind={owners[0]}"
           if owners else f"sampler.kind={cfg.kind}'s own settings: {', '.join(own) or 'none'}")
  return f"unknown config key 'sampler.{name}' for sampler.kind={cfg.kind}: {where}"


def check(cfg: SamplerConfig) -> None:
  """UserError naming the first bad setting of the section (shared, then the kind's own)."""
  checks = [
      (cfg.max_new_tokens >= 1, f"sampler.max_new_tokens must be >= 1, got {cfg.max_new_tokens}"),
      (cfg.temperature >= 0, f"sampler.temperature must be >= 0, got {cfg.temperature}"),
      (cfg.top_k >= 0, f"sampler.top_k must be >= 0, got {cfg.top_k}"),
      (0.0 < cfg.top_p <= 1.0, f"sampler.top_p must be in (0, 1], got {cfg.top_p}"),
      (cfg.seed >= 0, f"sampler.seed must be >= 0, got {cfg.seed}"),
      (cfg.num_samples >= 1, f"sampler.num_samples must be >= 1, got {cfg.num_samples}"),
      (cfg.selection in SELECTIONS,
       f"sampler.selection={cfg.selection!r} is unknown; valid: {', '.join(SELECTIONS)}"),
      (cfg.prune_every >= 1, f"sampler.prune_every must be >= 1, got {cfg.prune_every}"),
      (0.0 < cfg.prune_keep <= 1.0, f"sampler.prune_keep must be in (0, 1], got {cfg.prune_keep}"),
  ]
  for ok, message in checks:
    if not ok:
      raise UserError(message)
  try:
    cfg.spec.build(cfg.options(), Decode(max_new_tokens=cfg.max_new_tokens,
                                         sampling=cfg.sampling()))
    cfg.spec.slack(cfg.options())
  except (ValueError, TypeError) as e:
    raise UserError(f"sampler.kind={cfg.kind}: {e}") from None


for _kind in registry.KINDS:  # every class exists (and is importable) from the start
  class_of(_kind)

"""Every sampler kind, by name: `sampler.kind` -> its `spec.SamplerSpec`.

Adding a sampler: write its module (config, jitted `sample`, an options dataclass and a `SPEC`)
and add the `SPEC` here. The CLI, the experiment schema, `paxlike.generate` and the benches pick
it up from this table.
"""

from __future__ import annotations

from samplers import adaptive, apd, ar, assd, block_diffusion, contrastive, diffusion_drafted
from samplers import eagle
from samplers import edlm
from samplers import entropy_switch
from samplers import jacobi, learned_unmask, lookahead, mdlm, medusa, prompt_lookup, spectr
from samplers import speculative, tree, unmask
from samplers.spec import SamplerSpec

SPECS: dict[str, SamplerSpec] = {spec.kind: spec for spec in (
    ar.SPEC,
    speculative.SPEC,
    spectr.SPEC,
    tree.SPEC,
    tree.DYNAMIC_SPEC,
    adaptive.SPEC,
    jacobi.SPEC,
    prompt_lookup.SPEC,
    lookahead.SPEC,
    medusa.SPEC,
    eagle.SPEC,
    diffusion_drafted.SPEC,
    apd.SPEC,
    contrastive.SPEC,
    entropy_switch.SPEC,
    mdlm.SPEC,
    unmask.SPEC,
    block_diffusion.SPEC,
    edlm.SPEC,
    assd.SPEC,
    learned_unmask.SPEC,
)}
KINDS = tuple(SPECS)


def get(kind: str) -> SamplerSpec:
  """The spec of `kind`; ValueError naming the valid kinds otherwise."""
  if kind not in SPECS:
    raise ValueError(f"sampler.kind={kind!r} is unknown; valid: {', '.join(KINDS)}")
  return SPECS[kind]


def kinds_with(setting: str) -> list[str]:
  """The kinds that have `setting` among their options (for error messages)."""
  return [kind for kind, spec in SPECS.items()
          if setting in {f.name for f in spec.options.__dataclass_fields__.values()}]

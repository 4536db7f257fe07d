"""What a sampler module tells the layers above it: its settings, its models, its cache room.

Every sampler module exports a frozen config, a jitted `sample`, and a `SPEC` (one per kind it
implements). The spec is data: the experiment's `sampler` section for that kind is built from
`options` (paxlike.config), `paxlike.generate` checks the model and second model against it and
builds the sampler's config with `build`, and the benches dispatch through it. Registering a new
sampler is one module with a `SPEC` and one line in `samplers.registry`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from samplers.core.logits import SamplingParams

# What a sampler's first model must be: a causal LM, a masked-diffusion denoiser, an any-subset
# AR model, a denoiser with a Learn2PD finality head, or a causal LM with Medusa heads or an EAGLE
# draft head.
MODEL_KINDS = ("causal", "denoiser", "any_subset", "finality", "medusa", "eagle")
CAUSAL_KINDS = ("causal", "medusa", "eagle")  # the kinds that extend prompts token by token


@dataclasses.dataclass(frozen=True)
class Decode:
  """The settings every decode shares, resolved for one batch of prompts.

  Attributes:
    max_new_tokens: tokens to generate per row (already shortened to fit the cache).
    eos_id: the tokenizer's end-of-sequence id (stops a row), or None.
    pad_id: the id written after a row ends.
    sampling: temperature / top-k / top-p.
  """

  max_new_tokens: int = 1
  eos_id: int | None = None
  pad_id: int = 0
  sampling: SamplingParams = SamplingParams()

  def common(self) -> dict[str, Any]:
    """Keyword arguments of the autoregressive samplers' configs."""
    return dict(max_new_tokens=self.max_new_tokens, eos_id=self.eos_id, pad_id=self.pad_id,
                sampling=self.sampling)


def no_slack(options: Any) -> int:
  del options
  return 0


def whole_tokens(options: Any, prompt_len: int, max_new: int) -> int:
  del options, prompt_len
  return max_new


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
  """One sampler kind, described as data.

  Attributes:
    kind: the name of `sampler.kind`.
    options: a frozen dataclass whose fields (all with defaults) are this kind's own settings in
      an experiment (`--set sampler.<field>=...`), documented in its docstring.
    sample: the jitted sample function. Causal kinds take (models..., prompt [B, P],
      prompt_lengths [B], key, config); the others a canvas (models..., canvas [B, N], key,
      config).
    build: (options, Decode) -> the static config `sample` takes. It raises ValueError for bad
      settings (the sampler's config validates itself), so validation lives with the sampler.
    model: what the first model must be, one of MODEL_KINDS.
    second_model: "" (none), or what the second model is for, e.g. "draft": kinds with one take
      (model, params, second, second_params) in that order, unless `second_first`.
    second_first: the second model comes first in `sample`'s arguments (entropy switching
      decodes with the small model and consults the large one).
    second_kind: what the second model must be, one of MODEL_KINDS (a causal draft, or a
      denoiser that drafts for a causal target).
    slack: options -> cache slots needed past prompt + generated tokens (a draft window).
    fit: (options, prompt length, tokens that fit) -> tokens to generate (e.g. whole blocks).
    windowed_second: options -> whether the second model reads only a bounded window of the
      row (a denoiser drafting from the last `context_window` tokens), so that its max_len does
      not bound prompt + generation; the sampler checks the window itself.
  """

  kind: str
  options: type
  sample: Callable[..., Any]
  build: Callable[[Any, Decode], Any]
  model: str = "causal"
  second_model: str = ""
  second_first: bool = False
  second_kind: str = "causal"
  slack: Callable[[Any], int] = no_slack
  fit: Callable[[Any, int, int], int] = whole_tokens
  windowed_second: Callable[[Any], bool] = lambda options: False

  def __post_init__(self):
    for field, value in (("model", self.model), ("second_kind", self.second_kind)):
      if value not in MODEL_KINDS:
        raise ValueError(f"SamplerSpec {self.kind}: {field}={value!r}; valid: {MODEL_KINDS}")

  @property
  def takes_canvas(self) -> bool:
    """Diffusion-style: fills masks of a canvas instead of extending prompts."""
    return self.model not in CAUSAL_KINDS

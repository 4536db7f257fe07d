"""APD, adaptive parallel decoding (Israel, Van den Broeck and Grover 2025): a masked-diffusion
model's parallel proposal, with the accepted length set by a small causal model. Lossy by
design: the output follows neither model's distribution.

Each round the denoiser drafts the next gamma tokens in one call, each drawn from its marginal
p_D given the committed prefix, and the causal model scores them in one call. Speculative
sampling then accepts the chain against the multiplicative mixture

  p_T(x_i | x_<i)  proportional to  p_D(x_i)^R * p_AR(x_i | x_<i)^(1 - R)

(accept while u < p_T / p_D; at the first rejection draw from norm(max(0, p_T - p_D)); after a
fully accepted chain a bonus token from p_AR, which has no marginal past the window). So every
drafted position follows the mixture given what was committed before it: R = 0 is exactly the
causal model (`samplers.diffusion_drafted`), R = 1 accepts every draft (the denoiser's
independent marginals, gamma tokens per round), and in between the rounds run long where the two
models agree and short where they do not. The first token after the prompt comes from the
causal model's prefill. The rule is `diffusion_drafted`'s with `mixture=R`; the T = 1 oracle test
checks a drafted token's law against the enumerated mixture.
"""

from __future__ import annotations

import dataclasses

from samplers import diffusion_drafted
from samplers.spec import SamplerSpec


@dataclasses.dataclass(frozen=True)
class APDOptions:
  """`sampler.*` settings of kind "apd": the workdir's causal model scores, the second model
  (`--set sampler.draft_workdir=<an mdlm run>`, the target's vocabulary) proposes.

  Attributes:
    mixture: R in [0, 1], the denoiser's weight in the mixture (0: exact causal decoding).
    num_draft_tokens: gamma, tokens the denoiser proposes per round (one call).
    context_window: tokens of the row the denoiser sees before the masks (0: all of it).
  """

  mixture: float = 0.5
  num_draft_tokens: int = 8
  context_window: int = 32


SPEC = SamplerSpec(
    "apd", APDOptions, diffusion_drafted.sample,
    lambda o, decode: diffusion_drafted.DiffusionDraftedConfig(
        o.num_draft_tokens, context_window=o.context_window, mixture=o.mixture,
        **decode.common()),
    second_model="denoiser", second_kind="denoiser", slack=lambda o: o.num_draft_tokens,
    windowed_second=lambda o: o.context_window > 0)

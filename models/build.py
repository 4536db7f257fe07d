"""`build_model(config)`: the model object for `config.kind`, the one place that maps kinds to
classes. Every model object offers the training interface the trainer uses:

- `module`: the linen module; `module.init(key, tokens [B, L])` gives its (boxed) parameters.
- `loss(params, batch [B, L + 1], key, teacher_logits=None, distill_weight=1.0) -> (loss, parts)`:
  the scalar training loss and a dict of extra scalar metrics.
- `eval_nll(params, batch [B, L + 1], key) -> (summed nll in nats, token count)`: for held-out
  loss and bits per byte (an upper bound for models trained on an ELBO).
- `teacher_inputs(batch)`: the tokens a distillation teacher scores (causal models only).
"""

from __future__ import annotations

from models.acceptance_head import AcceptanceDraftLM
from models.asarm import AnySubsetARM
from models.causal_lm import CausalLM
from models.config import ModelConfig
from models.diffusion import MaskedDiffusionLM
from models.learn2pd import Learn2PD
from models.eagle import EagleLM
from models.medusa import MedusaLM

_KINDS = {"llama": CausalLM, "mdlm": MaskedDiffusionLM, "asarm": AnySubsetARM,
          "learn2pd": Learn2PD}


def build_model(config: ModelConfig):
  """The model object of `config.kind` (validated)."""
  config.validate()
  if config.draft_heads.acceptance:
    return AcceptanceDraftLM(config)
  if config.draft_heads.medusa:
    return MedusaLM(config)
  if config.draft_heads.eagle:
    return EagleLM(config)
  return _KINDS[config.kind](config)

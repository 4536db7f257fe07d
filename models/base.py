"""`TransformerModel`: what every model object built on the Llama `Transformer` shares.

Model objects are frozen, hashable dataclasses holding only their `ModelConfig` (so they can be
static arguments of `jax.jit`); parameters and caches are passed explicitly. Subclasses add their
protocol (`CausalLM`: cached causal decoding; `MaskedDiffusionLM`: denoising; `AnySubsetARM`:
conditionals under an order) and their training objective.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.config import ModelConfig
from models.llama import Transformer


@dataclasses.dataclass(frozen=True)
class TransformerModel:
  """A validated config and the sizes, module and fresh parameters it implies."""

  config: ModelConfig
  remat: str = "none"  # the blocks' rematerialisation policy in training (`Transformer.remat`)

  def __post_init__(self):
    self.config.validate()

  @property
  def vocab_size(self) -> int:
    return self.config.vocab_size

  @property
  def max_len(self) -> int:
    """Longest sequence (prompt + generation) a sampler may ask for."""
    return self.config.max_len

  @property
  def mask_id(self) -> int:
    """The mask token of the diffusion-style models (unused by causal ones)."""
    return self.config.diffusion.mask_id

  @property
  def module(self) -> nn.Module:
    return Transformer(self.config, remat=self.remat)

  def init(self, key: jax.Array) -> dict:
    """Fresh float32 parameters, unboxed (plain arrays). For the logical axis names, use
    `self.module.init(key, tokens)['params']` and `nn.get_partition_spec`."""
    return nn.meta.unbox(_init(self, key))


@functools.partial(jax.jit, static_argnums=0)
def _init(model: TransformerModel, key: jax.Array) -> dict:
  """`model`'s boxed parameters from `key`, compiled once per model (models are hashable): the
  random initialisers of every leaf take seconds to compile on CPU, whatever the seed."""
  return model.module.init(key, jnp.zeros((1, 1), jnp.int32))["params"]

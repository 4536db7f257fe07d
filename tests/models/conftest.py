"""Shared small decoder config and jitted entry points for the model tests (as fixtures)."""

import functools

import jax
import pytest

from models.causal_lm import CausalLM
from models.config import ModelConfig
from tests.models.random_params import random_params


@functools.cache
def _build(config: ModelConfig) -> tuple[CausalLM, dict]:
  model = CausalLM(config)
  return model, random_params(model)


@pytest.fixture(scope="session")
def small_config() -> ModelConfig:
  """GQA (4 query heads, 2 kv heads); a large init_std makes the random model context-sensitive."""
  return ModelConfig(vocab_size=32, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2,
                     mlp_dim=64, max_len=32, init_std=0.1)


@pytest.fixture(scope="session")
def build():
  """config -> (model, unboxed numpy-drawn params, seed 0), cached across tests."""
  return _build


@pytest.fixture(scope="session")
def apply():
  """Jitted `CausalLM.apply(model, params, tokens, positions, cache, attention_mask=None)`."""
  return jax.jit(CausalLM.apply, static_argnums=0)


@pytest.fixture(scope="session")
def full_logits():
  """Jitted `CausalLM.logits(model, params, tokens)`."""
  return jax.jit(CausalLM.logits, static_argnums=0)

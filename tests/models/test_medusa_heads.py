"""Medusa heads: built from the config, the loss trains only the heads, an untrained head repeats
the target's next-token prediction, and the trainer fits the heads on a frozen target that the
medusa sampler then decodes (greedy = AR) from Python and from the CLI."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.build import build_model
from models.config import DraftHeadsConfig, ModelConfig
from models.medusa import MedusaLM
from paxlike import config as config_lib
from paxlike import registry
from paxlike.errors import UserError
from tests.models.frozen_target import check_heads_fit_and_decode
from tests.models.random_params import random_params

registry.load_modules()
CONFIG = ModelConfig(num_layers=1, d_model=16, num_heads=2, num_kv_heads=2, mlp_dim=32,
                     vocab_size=32, max_len=16, draft_heads=DraftHeadsConfig(medusa=3))


def test_the_heads_start_as_the_next_token_head_and_only_they_get_gradients():
  model = build_model(CONFIG)
  assert isinstance(model, MedusaLM) and model.num_medusa_heads == 3
  params = random_params(model)
  params["medusa"] = jax.tree.map(jnp.zeros_like, params["medusa"])
  tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, 32)
  logits, heads = model.logits_with_heads(params, tokens)
  for k in range(3):  # zero-initialised blocks: h + silu(0) = h, the target's own projection
    np.testing.assert_allclose(heads[:, :, k], logits, rtol=1e-5, atol=1e-5)
  params = random_params(model)
  batch = jax.random.randint(jax.random.key(2), (2, 9), 0, 32)
  grads, parts = jax.jit(jax.grad(lambda p: model.loss(p, batch, None), has_aux=True))(params)
  norms = {name: float(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(tree)))
           for name, tree in grads.items() if name != "embed"}  # the tied projection: frozen
  assert norms.pop("medusa") > 0 and not any(norms.values()), norms  # by train.trainable
  assert set(parts) == {"head_1_top1", "head_2_top1", "head_3_top1"}


def test_bad_medusa_settings_are_named():
  tiny = registry.get("tiny")
  with pytest.raises(UserError, match="set train.trainable=medusa"):
    config_lib.validate(config_lib.apply_overrides(tiny, ["model.draft_heads.medusa=2"]))
  with pytest.raises(UserError, match="must be >= 0 heads"):
    config_lib.validate(config_lib.apply_overrides(tiny, ["model.draft_heads.medusa=-1"]))
  with pytest.raises(ValueError, match="not several"):
    dataclasses.replace(CONFIG, draft_heads=DraftHeadsConfig(acceptance=True, medusa=2)).validate()


@pytest.mark.slow
def test_the_trainer_fits_the_heads_on_a_frozen_target_and_the_sampler_uses_them(tmp_path):
  """target (3 steps) -> heads (target frozen, 30 steps): head 1's loss falls, the target's
  weights are untouched; greedy Medusa decoding equals greedy AR, from Python and the CLI."""
  check_heads_fit_and_decode(tmp_path, "medusa", "model.draft_heads.medusa=2",
                             {"branching": (2, 1)}, ["branching=2,1"],
                             "a causal model with Medusa heads")

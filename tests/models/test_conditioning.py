"""Conditional (prompt -> response) training of the diffusion-style models
(`model.diffusion.response_after`):
which positions are responses, and that the MDLM noise, the AS-ARM orders and the Learn2PD
trajectories touch only those, with bounds counted per response token."""

import dataclasses
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.asarm import AnySubsetARM
from models.conditioning import response_positions
from models.config import DiffusionConfig, FinalityConfig, ModelConfig
from models.diffusion import MaskedDiffusionLM
from models.learn2pd import Learn2PD
from tests.models.random_params import random_params

CONFIG = ModelConfig(kind="mdlm", num_layers=1, d_model=16, num_heads=2, num_kv_heads=2,
                     mlp_dim=32, max_len=32, diffusion=DiffusionConfig(response_after="="))
TEXT = "ab=cd\nx=y=z\nq=r"  # window ends mid-line, a second '=' stays inside the response
RESPONSE = "000110001110001"


def _tokens(text: str, rows: int = 1) -> jax.Array:
  return jnp.tile(jnp.asarray(np.frombuffer(text.encode(), np.uint8), jnp.int32), (rows, 1))


def test_response_positions_follow_the_separator_on_each_line():
  got = np.asarray(response_positions(_tokens(TEXT), "="))[0]
  assert "".join("1" if v else "0" for v in got) == RESPONSE
  starts_inside = np.asarray(response_positions(_tokens("cd\nx=y"), "="))[0]
  np.testing.assert_array_equal(starts_inside, [0, 0, 0, 0, 0, 1])  # no '=' before "cd"


def test_mdlm_noises_only_responses_and_counts_them():
  model = MaskedDiffusionLM(CONFIG)
  tokens = _tokens(TEXT, rows=256)
  response = np.array([c == "1" for c in RESPONSE])
  _, masked, _ = jax.jit(model.corrupt, static_argnums=2)(tokens, jax.random.key(0), 0.0)
  masked = np.asarray(masked)
  assert not masked[:, ~response].any() and masked[:, response].mean() > 0.3
  params = random_params(model)
  batch = jnp.concatenate([tokens[:4], tokens[:4, :1]], axis=1)
  total, count = jax.jit(model.eval_nll)(params, batch, jax.random.key(1))
  assert float(count) == 4 * response.sum() and math.isfinite(float(total))


def test_conditional_elbo_is_its_enumeration_over_response_masks():
  """The Monte-Carlo conditional ELBO is unbiased for its exact value: the sum over the mask
  patterns of the R response positions (the prompt always visible) of B(m, R - m + 1) times the
  masked responses' cross-entropy, the unconditional bound of test_diffusion with L -> R."""
  model = MaskedDiffusionLM(CONFIG)
  params = random_params(model)
  x = np.frombuffer(b"k=bad", np.uint8).astype(np.int32)
  response = [2, 3, 4]
  denoise = jax.jit(model.denoise)
  exact = 0.0
  for pattern in itertools.product([False, True], repeat=len(response)):
    hidden = [i for i, hide in zip(response, pattern) if hide]
    if not hidden:
      continue
    z = x.copy()
    z[hidden] = model.mask_id
    logp = np.asarray(denoise(params, jnp.asarray(z[None])))[0]
    m, r = len(hidden), len(response)
    weight = math.factorial(m - 1) * math.factorial(r - m) / math.factorial(r)
    exact += weight * -sum(logp[i, x[i]] for i in hidden)
  rows = 8192
  per_row, _ = jax.jit(model.elbo)(params, jnp.tile(jnp.asarray(x), (rows, 1)), jax.random.key(3))
  per_row = np.asarray(per_row, np.float64)
  assert abs(per_row.mean() - exact) < 4 * per_row.std() / math.sqrt(rows) + 1e-3


def test_asarm_orders_only_responses_and_counts_them():
  model = AnySubsetARM(dataclasses.replace(CONFIG, kind="asarm"))
  params = random_params(model)
  tokens = _tokens(TEXT, rows=4)
  batch = jnp.concatenate([tokens, tokens[:, :1]], axis=1)
  total, count = jax.jit(model.eval_nll)(params, batch, jax.random.key(0))
  assert float(count) == 4 * RESPONSE.count("1") and float(total) > 0
  loss, _ = jax.jit(model.loss)(params, batch, jax.random.key(1))
  assert math.isfinite(float(loss))


def test_learn2pd_trajectory_starts_from_masked_responses():
  model = Learn2PD(dataclasses.replace(CONFIG, kind="learn2pd",
                                       finality=FinalityConfig(dim=8, steps=2)))
  params = random_params(model)
  _, predictions, masked = jax.jit(model.trajectory)(params, _tokens(TEXT, rows=2))
  response = np.array([c == "1" for c in RESPONSE])
  np.testing.assert_array_equal(np.asarray(masked[0]), np.tile(response, (2, 1)))
  assert np.asarray(masked[1]).sum() == 2 * math.floor(response.sum() / 2)  # half committed
  np.testing.assert_array_equal(np.asarray(predictions[:, :, ~response]),
                                np.broadcast_to(np.asarray(_tokens(TEXT))[:, ~response],
                                                (2, 2, int((~response).sum()))))


@pytest.mark.parametrize("changes,message", [
    (dict(diffusion=DiffusionConfig(response_after="=>")), "must be one ASCII character"),
    (dict(diffusion=DiffusionConfig(response_after="\n")), "other than a newline"),
    (dict(kind="llama"), "applies to kinds mdlm, asarm and learn2pd"),
])
def test_bad_separator_is_named(changes, message):
  with pytest.raises(ValueError, match=message):
    dataclasses.replace(CONFIG, **changes).validate()

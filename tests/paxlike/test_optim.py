"""Learning-rate schedules and the optimizer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paxlike.config import OptimizerConfig, ScheduleConfig
from paxlike.optim import learning_rate_schedule, make_optimizer

OPT = OptimizerConfig(learning_rate=1.0)


def values(kind, steps=100, **kw):
  schedule = learning_rate_schedule(OPT, ScheduleConfig(kind=kind, warmup_steps=10,
                                                        min_lr_ratio=0.1, **kw), steps)
  return np.array([float(schedule(s)) for s in range(steps + 1)])


@pytest.mark.parametrize("kind", ["cosine", "wsd", "constant"])
def test_linear_warmup_to_peak(kind):
  lr = values(kind)
  np.testing.assert_allclose(lr[:11], np.linspace(0, 1, 11), atol=1e-6)


def test_cosine_decays_to_floor():
  lr = values("cosine")
  assert np.all(np.diff(lr[10:]) <= 1e-7)
  assert lr[-1] == pytest.approx(0.1)
  assert lr[55] == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-3)  # half way through the cosine


def test_wsd_is_flat_then_decays_linearly():
  lr = values("wsd", decay_fraction=0.2)
  np.testing.assert_allclose(lr[10:81], 1.0)
  np.testing.assert_allclose(lr[80:], np.linspace(1.0, 0.1, 21), atol=1e-6)


def test_constant_after_warmup():
  np.testing.assert_allclose(values("constant")[10:], 1.0)


def test_clipping_and_decay_mask():
  tx = make_optimizer(OptimizerConfig(learning_rate=0.1, clip_norm=1.0, weight_decay=0.5),
                      ScheduleConfig(kind="constant", warmup_steps=0), 10)
  params = {"kernel": jnp.ones((2, 2)), "scale": jnp.ones((2,))}
  state = tx.init(params)
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero_grads, state, params)
  assert float(jnp.abs(updates["kernel"]).max()) > 0  # decayed
  assert float(jnp.abs(updates["scale"]).max()) == 0  # norm scales are not decayed

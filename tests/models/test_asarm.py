"""Any-subset AR model: what each position may see under a partial order, that the chain rule
under any order is a proper distribution (enumerated), that equal ranks give the rank-0
conditionals, the training orders, and the trainer end to end."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.asarm import AnySubsetARM
from models.config import DiffusionConfig, ModelConfig
from tests.models.diffusion_training import train
from tests.models.random_params import random_params

MASK = 3  # tokens 0..2
TINY = ModelConfig(kind="asarm", vocab_size=4, diffusion=DiffusionConfig(mask_id=MASK),
                   num_layers=2, d_model=16, num_heads=2, num_kv_heads=1, mlp_dim=32, max_len=8,
                   init_std=0.5)


@pytest.fixture(scope="module")
def asarm():
  model = AnySubsetARM(TINY)
  return model, random_params(model), jax.jit(model.conditionals)


def test_a_position_sees_exactly_the_lower_ranks(asarm):
  model, params, conditionals = asarm
  ranks = jnp.array([[-1, 2, 0, -1, 1, 1, 3, 0]], jnp.int32)
  tokens = jnp.array([[0, 1, 2, 1, 0, 2, 1, 0]], jnp.int32)
  base = np.asarray(conditionals(params, tokens, ranks))[0]
  for j in range(8):
    changed = np.asarray(conditionals(params, tokens.at[0, j].set((tokens[0, j] + 1) % 3),
                                      ranks))[0]
    for i in range(8):
      if ranks[0, i] < 0:
        continue
      moved = np.abs(changed[i, :MASK] - base[i, :MASK]).max()
      if ranks[0, j] < ranks[0, i]:
        assert moved > 1e-4, (i, j)  # a lower rank (or visible) token is seen
      else:
        assert moved == 0.0, (i, j)  # equal or higher rank, itself included: never seen
  np.testing.assert_allclose(np.exp(base[:, :MASK]).sum(-1), 1.0, rtol=1e-5)
  assert np.all(np.isneginf(base[:, MASK]))


def _joint(conditionals, params, order, prompt=None):
  """p(x) = prod_j p(x_order[j] | x_order[<j]) for every x over L = len(order) positions, from one
  batched pass per order (ranks = place in the order; an optional visible prompt before them)."""
  length = len(order)
  seqs = np.array(list(itertools.product(range(MASK), repeat=length)), np.int32)
  ranks = np.empty(length, np.int32)
  ranks[list(order)] = np.arange(length)
  if prompt is not None:
    seqs = np.concatenate([np.tile(prompt, (len(seqs), 1)), seqs], axis=1)
    ranks = np.concatenate([np.full(len(prompt), -1, np.int32), ranks])
  logp = np.asarray(conditionals(params, jnp.asarray(seqs),
                                 jnp.asarray(np.tile(ranks, (len(seqs), 1)))))
  offset = 0 if prompt is None else len(prompt)
  picked = np.take_along_axis(logp[:, offset:], seqs[:, offset:, None], axis=-1)[..., 0]
  return np.exp(picked.sum(-1))


def test_chain_rule_under_any_order_is_a_distribution(asarm):
  _, params, conditionals = asarm
  for order in [(0, 1, 2), (2, 0, 1)]:
    np.testing.assert_allclose(_joint(conditionals, params, order).sum(), 1.0, rtol=1e-5)
  with_prompt = _joint(conditionals, params, (1, 2, 0), prompt=np.array([2, 0], np.int32))
  np.testing.assert_allclose(with_prompt.sum(), 1.0, rtol=1e-5)


def test_equal_ranks_give_the_first_conditional_of_every_order(asarm):
  _, params, conditionals = asarm
  tokens = jnp.array([[1, 0, 2, 2, 1, 0, 2, 1]], jnp.int32)
  visible = np.array([-1, 0, -1, 0, 0, -1, 0, 0], np.int32)
  independent = np.asarray(conditionals(params, tokens, jnp.asarray(visible)[None]))[0]
  for i in np.nonzero(visible == 0)[0]:
    ranks = np.where(visible < 0, -1, 1 + np.arange(8))  # some order with i first
    ranks[i] = 0
    first = np.asarray(conditionals(params, tokens, jnp.asarray(ranks)[None]))[0, i]
    np.testing.assert_allclose(independent[i], first, atol=1e-5)


def test_training_orders_are_permutations_after_a_visible_prefix():
  random_ranks = jax.jit(AnySubsetARM.random_ranks, static_argnums=(2,))
  ranks = np.asarray(random_ranks(jax.random.key(0), jnp.ones((64, 8), bool), True))
  for row in ranks:
    ranked = np.sort(row[row >= 0])
    np.testing.assert_array_equal(ranked, np.arange(len(ranked)))
    assert 1 <= len(ranked) <= 8
  visible_counts = (ranks < 0).sum(-1)
  assert visible_counts.min() == 0 and visible_counts.max() >= 6
  full = np.asarray(random_ranks(jax.random.key(1), jnp.ones((4, 8), bool), False))
  np.testing.assert_array_equal(np.sort(full, axis=-1), np.tile(np.arange(8), (4, 1)))
  # Conditional: positions 0..2 are prompt, always visible; the responses are ordered after them.
  orderable = jnp.broadcast_to(jnp.arange(8) >= 3, (64, 8))
  ranks = np.asarray(random_ranks(jax.random.key(2), orderable, True))
  assert np.all(ranks[:, :3] == -1)
  for row in ranks:
    np.testing.assert_array_equal(np.sort(row[row >= 0]), np.arange(np.sum(row >= 0)))
  assert (ranks[:, 3:] < 0).sum(-1).min() == 0 and (ranks[:, 3:] >= 0).sum(-1).min() >= 1
  full = np.asarray(random_ranks(jax.random.key(3), orderable, False))
  np.testing.assert_array_equal(np.sort(full[:, 3:], axis=-1), np.tile(np.arange(5), (64, 1)))


@pytest.mark.slow
def test_trainer_lowers_the_random_order_nll(tmp_path):
  _, losses, evals = train("asarm", tmp_path / "run")
  assert sorted(losses) == list(range(1, 9))
  assert all(map(math.isfinite, evals.values())) and evals[8] < evals[0] - 0.5

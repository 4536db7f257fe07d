"""Greedy verification in closed form equals the general rules with one-hot distributions."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from samplers.core import tree_walk, verify
from samplers.core.logits import SamplingParams, probs

GREEDY = SamplingParams(temperature=0.0)


def _general_chain(drafts, logits, lengths):
  """`single_draft` per position with one-hot p and q, then the speculative emission rule."""
  batch, gamma = drafts.shape
  p = probs(logits, GREEDY)
  q = jax.nn.one_hot(drafts, logits.shape[-1])
  u = jnp.full((batch, gamma + 1, 1 + logits.shape[-1]), 0.5)
  accepted, tokens = jax.vmap(jax.vmap(verify.single_draft))(u[:, :gamma], p[:, :gamma], q, drafts)
  accepted &= jnp.arange(gamma)[None, :] < lengths[:, None]
  count = jnp.sum(jnp.cumprod(accepted, axis=1), axis=1)
  bonus = jnp.argmax(jnp.take_along_axis(p, lengths[:, None, None], axis=1)[:, 0], axis=-1)
  at = jnp.take_along_axis(tokens, jnp.minimum(count, gamma - 1)[:, None], axis=1)[:, 0]
  return np.asarray(count), np.asarray(jnp.where(count < lengths, at, bonus))


@pytest.mark.parametrize("seed", range(4))
def test_greedy_chain_equals_single_draft_with_one_hot_distributions(seed):
  rng = np.random.default_rng(seed)
  batch, gamma, vocab = 16, 5, 7
  logits = jnp.asarray(rng.normal(size=(batch, gamma + 1, vocab)), jnp.float32)
  top = np.asarray(jnp.argmax(logits, axis=-1))
  drafts = top[:, :gamma].copy()  # corrupt a random suffix so every acceptance count occurs
  for b in range(batch):
    cut = rng.integers(0, gamma + 1)
    drafts[b, cut:] = (drafts[b, cut:] + rng.integers(1, vocab, gamma - cut)) % vocab
  lengths = jnp.asarray(rng.integers(1, gamma + 1, batch), jnp.int32)
  emitted, count = verify.greedy_chain(jnp.asarray(drafts, jnp.int32), logits, lengths)
  want_count, want_last = _general_chain(jnp.asarray(drafts), logits, lengths)
  np.testing.assert_array_equal(count, want_count)
  emitted = np.asarray(emitted)
  for b in range(batch):
    np.testing.assert_array_equal(emitted[b, :count[b]], drafts[b, :count[b]])
    assert emitted[b, count[b]] == want_last[b]
  assert len(set(np.asarray(count).tolist())) > 2


def test_greedy_chain_that_emits_the_draft_at_a_rejection_is_caught():
  """A broken variant (the draft instead of the target's argmax after a mismatch) differs."""
  logits = jnp.asarray([[[0.0, 3.0, 1.0], [2.0, 0.0, 1.0], [0.0, 0.0, 5.0]]], jnp.float32)
  drafts = jnp.asarray([[1, 2]], jnp.int32)  # the first matches, the second does not
  emitted, count = verify.greedy_chain(drafts, logits)
  assert int(count[0]) == 1 and int(emitted[0, 1]) == 0  # the target's argmax, not draft 2
  broken = jnp.concatenate([drafts, drafts[:, :1]], axis=1)
  assert int(broken[0, 1]) != int(emitted[0, 1])


@pytest.mark.parametrize("seed", range(4))
def test_greedy_walk_equals_recursive_rejection_with_one_hot_distributions(seed):
  rng = np.random.default_rng(seed)
  vocab, depth = 4, 3
  parent = np.array([-1, -1, 0, 0, 1, 2, 2], np.int32)
  node_depth = np.array([1, 1, 2, 2, 2, 3, 3], np.int32)
  size = len(parent)
  for trial in range(20):
    tokens = jnp.asarray(rng.integers(0, vocab, size), jnp.int32)
    valid = jnp.asarray(rng.random(size) < 0.9)
    logits = jnp.asarray(rng.normal(size=(1 + size, vocab)), jnp.float32)
    top = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    walk = functools.partial(tree_walk.greedy_walk, depth_max=depth)
    count, last, path = walk(top, tokens, jnp.asarray(parent), valid)
    u = jnp.full((depth + 1, size + vocab), 0.5)
    want = tree_walk.walk(u, probs(logits, GREEDY), jax.nn.one_hot(tokens, vocab), tokens,
                      jnp.asarray(parent), valid)
    assert int(count) == int(want[0]) and int(last) == int(want[1])
    np.testing.assert_array_equal(np.asarray(path)[:int(count)], np.asarray(want[2])[:int(count)])
    assert np.all(node_depth[np.asarray(path)[:int(count)]] == np.arange(1, int(count) + 1))

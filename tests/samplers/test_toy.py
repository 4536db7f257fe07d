"""The trigram toy is a faithful oracle: cached calls and exact joint follow its definition."""

import jax
import jax.numpy as jnp
import numpy as np

from tests.samplers import toy

MODEL = toy.TrigramLM(vocab_size=5, max_len=12)
TABLE = MODEL.init(jax.random.key(0))


def _by_definition(sequence):
  """Logits after each token: table[previous, current], previous of the first token = 0."""
  previous = [0] + list(sequence[:-1])
  return np.asarray(TABLE)[previous, sequence]


def _apply(tokens, cache, mask=None):
  tokens = jnp.asarray(tokens, jnp.int32)
  return MODEL.apply(TABLE, tokens, jnp.zeros_like(tokens), cache, mask)


def test_cached_calls_and_rollback_follow_the_definition():
  sequence = [1, 4, 2, 2, 0, 3]
  cache = MODEL.init_cache(1)
  first, cache = _apply([sequence[:3]], cache)
  _, cache = _apply([[3, 3]], cache)  # rejected draft
  cache = cache.replace(lengths=cache.lengths - 2)
  rest, cache = _apply([sequence[3:]], cache)
  np.testing.assert_array_equal(jnp.concatenate([first, rest], axis=1)[0], _by_definition(sequence))
  np.testing.assert_array_equal(cache.lengths, [6])


def test_tree_mask_conditions_each_node_on_its_parent():
  # Prefix [1, 2]; tree: a=3 (root), b=0 and c=4 children of a, d=1 child of c.
  mask = jnp.array([[[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 1]]], bool)
  cache = MODEL.init_cache(1)
  _, cache = _apply([[1, 2]], cache)
  logits, _ = _apply([[3, 0, 4, 1]], cache, mask)
  for node, path in {0: [3], 1: [3, 0], 2: [3, 4], 3: [3, 4, 1]}.items():
    np.testing.assert_array_equal(logits[0, node], _by_definition([1, 2] + path)[-1])


def test_exact_joint_is_the_product_of_conditionals():
  joint = toy.exact_joint(TABLE, [1, 2], 3)
  assert joint.shape == (5, 5, 5)
  np.testing.assert_allclose(joint.sum(), 1.0, rtol=1e-12)
  continuation = [4, 0, 3]
  expected = 1.0
  for i, token in enumerate(continuation):
    expected *= toy.softmax(_by_definition([1, 2] + continuation[:i])[-1])[token]
  np.testing.assert_allclose(joint[tuple(continuation)], expected, rtol=1e-6)

"""Contrastive decoding on tabular models: the reduction to plain greedy AR (exact), the plausible
set, and mismatched vocabularies."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from samplers import ar, contrastive
from samplers.core.logits import SamplingParams
from tests.samplers import toy

V = 6
EXPERT = toy.TrigramLM(vocab_size=V, max_len=40)
PROMPTS = ar.pad_prompts([[1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1], [3]])
GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def tables():
  return EXPERT.init(jax.random.key(1)), EXPERT.init(jax.random.key(2))


def test_uniform_amateur_is_expert_greedy(tables):
  uniform = jnp.zeros((V, V, V))
  out = contrastive.sample(EXPERT, tables[0], EXPERT, uniform, *PROMPTS, jax.random.key(0),
                           contrastive.ContrastiveConfig(max_new_tokens=16, alpha=0.1))
  greedy = ar.sample(EXPERT, tables[0], *PROMPTS, jax.random.key(0),
                     ar.ARConfig(max_new_tokens=16, sampling=GREEDY))
  np.testing.assert_array_equal(out.tokens, greedy.tokens)
  assert int(out.stats["expert_calls"]) == int(out.stats["amateur_calls"]) == 16


def test_contrastive_scores():
  expert = jnp.log(jnp.array([0.5, 0.3, 0.15, 0.05]))
  amateur = jnp.log(jnp.array([0.7, 0.1, 0.1, 0.1]))
  scores = contrastive.contrastive_scores(expert, amateur, alpha=0.2)
  # plausible: p >= 0.1 -> tokens 0, 1, 2; token 1 wins log(0.3/0.1) over log(0.5/0.7)
  assert np.isneginf(scores[3]) and int(jnp.argmax(scores)) == 1
  np.testing.assert_allclose(scores[:3], np.log([0.5 / 0.7, 3.0, 1.5]), rtol=1e-5)
  assert int(jnp.argmax(contrastive.contrastive_scores(expert, amateur, alpha=1.0))) == 0


def test_mismatched_vocabulary_is_a_clear_error(tables):
  other = toy.TrigramLM(vocab_size=V + 1, max_len=40)
  with pytest.raises(ValueError, match="amateur's vocab_size 7 differs from the expert's"):
    contrastive.sample(EXPERT, tables[0], other, jnp.zeros((V + 1,) * 3), *PROMPTS,
                       jax.random.key(0), contrastive.ContrastiveConfig(max_new_tokens=4))
  with pytest.raises(ValueError, match="alpha"):
    contrastive.ContrastiveConfig(max_new_tokens=4, alpha=0.0)

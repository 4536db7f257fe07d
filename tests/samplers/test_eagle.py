"""EAGLE decoding: greedy equality with AR (a toy whose head drafts right only when the sampler
hands it the right features and keeps its cache right, and a Llama with a random head),
stopping, per-row randomness and bad input. Its exact target joint at T = 1 over eight tokens,
with a broken residual caught, is in test_long_oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.config import DraftHeadsConfig, ModelConfig
from models.eagle import EagleLM
from samplers import ar, eagle
from samplers.core.logits import SamplingParams
from tests.models.random_params import random_params
from tests.samplers import oracle, toy
from tests.samplers.toy_drafters import WithFeatureHead

GREEDY = SamplingParams(temperature=0.0)
VOCAB = 8


def _fibonacci(vocab: int = VOCAB) -> jax.Array:
  """A trigram table whose greedy continuation of (a, b) is a + b + 1 (mod vocab): the next token
  depends on both, so a head that reads the wrong feature or cache slot drafts wrong tokens."""
  index = np.arange(vocab)
  table = np.zeros((vocab,) * 3, np.float32)
  table[index[:, None], index[None, :], (index[:, None] + index[None, :] + 1) % vocab] = 5.0
  return jnp.asarray(table)


def _toy(batch: int, head: str, max_len: int = 40):
  model = WithFeatureHead(toy.TrigramLM(vocab_size=VOCAB, max_len=max_len))
  table = _fibonacci() + 0.1 * jax.random.normal(jax.random.key(batch), (VOCAB,) * 3)
  heads = {"right": table, "random": 2.0 * jax.random.normal(jax.random.key(batch + 10),
                                                              (VOCAB,) * 3)}
  return model, {"base": table, "head": heads[head]}


@pytest.mark.parametrize("batch, head, threshold", [(1, "right", 0.0), (8, "right", 0.0),
                                                    (3, "random", 0.0), (8, "random", 0.0),
                                                    (8, "random", 0.95)])
def test_equals_greedy_ar_on_a_table_model(batch, head, threshold):
  """A `right` head drafts the target's own continuation (every draft accepted), a `random`
  one mostly wrong tokens; both give AR's tokens, and so does a row that stops drafting where
  the head is unsure (`confidence_threshold`)."""
  model, params = _toy(batch, head)
  rng = np.random.default_rng(batch)
  padded = ar.pad_prompts([rng.integers(0, VOCAB, rng.integers(1, 6)).tolist()
                           for _ in range(batch)])
  expected = ar.sample(model, params, *padded, jax.random.key(0),
                       ar.ARConfig(max_new_tokens=16, sampling=GREEDY))
  got = eagle.sample(model, params, *padded, jax.random.key(0),
                     eagle.EagleConfig(num_draft_tokens=4, max_new_tokens=16, sampling=GREEDY,
                                       confidence_threshold=threshold))
  np.testing.assert_array_equal(got.tokens, expected.tokens)
  stats = {k: float(v) for k, v in got.stats.items()}
  if threshold:
    assert 1.0 <= stats["mean_draft_length"] < 3.5 and stats["draft_calls_saved"] > 0, stats
  elif head == "right":
    assert stats["acceptance"] > 0.95 and stats["tokens_per_target_call"] > 3.0, stats
  else:
    assert stats["acceptance"] < 0.6, stats


def test_one_token_prompts():
  """P = 1: the head starts from no prompt pairs, only the first token's feature."""
  model, params = _toy(1, "right")
  padded = ar.pad_prompts([[3], [5]])
  expected = ar.sample(model, params, *padded, jax.random.key(0),
                       ar.ARConfig(max_new_tokens=8, sampling=GREEDY))
  got = eagle.sample(model, params, *padded, jax.random.key(0),
                     eagle.EagleConfig(num_draft_tokens=3, max_new_tokens=8, sampling=GREEDY))
  np.testing.assert_array_equal(got.tokens, expected.tokens)


def test_equals_greedy_ar_on_a_llama_with_a_head():
  config = ModelConfig(vocab_size=32, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2,
                       mlp_dim=64, max_len=48, init_std=0.5, tie_embeddings=False,
                       draft_heads=DraftHeadsConfig(eagle=True))
  model = EagleLM(config)
  params = random_params(model)
  padded = ar.pad_prompts([[1, 2, 3, 4, 5], [7, 8], [3, 3, 3, 1], [9]])
  expected = ar.sample(model, params, *padded, jax.random.key(0),
                       ar.ARConfig(max_new_tokens=16, sampling=GREEDY))
  got = eagle.sample(model, params, *padded, jax.random.key(0),
                     eagle.EagleConfig(num_draft_tokens=3, max_new_tokens=16, sampling=GREEDY))
  mismatched = np.flatnonzero(np.any(np.asarray(got.tokens != expected.tokens), axis=1))
  assert mismatched.size <= 1, mismatched  # a float near-tie at most
  assert int(got.stats["draft_calls"]) == 1 + 3 * (int(got.stats["target_calls"]) - 1)


def test_eos_and_max_new_tokens_stop_rows_independently():
  model, params = _toy(1, "right", max_len=24)
  prompt, lengths = ar.pad_prompts([[5], [0, 2], [6, 6], [1]])
  config = eagle.EagleConfig(num_draft_tokens=3, max_new_tokens=6, sampling=GREEDY, eos_id=7)
  out = eagle.sample(model, params, prompt, lengths, jax.random.key(0), config)
  expected = ar.sample(model, params, prompt, lengths, jax.random.key(0),
                       ar.ARConfig(max_new_tokens=6, sampling=GREEDY, eos_id=7))
  np.testing.assert_array_equal(out.tokens, expected.tokens)
  np.testing.assert_array_equal(out.lengths, expected.lengths)
  assert sorted(set(np.asarray(out.lengths).tolist())) != [6], out.lengths  # some stop at eos


def test_rows_follow_their_keys_whatever_the_batch_order_and_under_vmap():
  model = WithFeatureHead(toy.TOY)
  params = {"base": toy.TARGET, "head": toy.TOY.init(jax.random.key(3))}
  prompt, lengths = ar.pad_prompts([[1, 2], [3], [0, 1, 2], [2, 2]])
  for threshold in (0.0, 0.6):  # rows that stop drafting early share the draft loop
    config = eagle.EagleConfig(num_draft_tokens=2, max_new_tokens=6, eos_id=0,
                               confidence_threshold=threshold)
    run = lambda order, row_keys: eagle.sample(model, params, prompt[order], lengths[order],
                                               row_keys, config)
    oracle.assert_rows_follow_their_keys(run)


def test_bad_input_is_a_clear_error():
  prompt, lengths = ar.pad_prompts([[1, 2]])
  config = eagle.EagleConfig(num_draft_tokens=2, max_new_tokens=4)
  with pytest.raises(ValueError, match="needs a target with an EAGLE draft head"):
    eagle.sample(toy.TOY, toy.TARGET, prompt, lengths, jax.random.key(0), config)
  model, params = _toy(1, "right", max_len=6)
  with pytest.raises(ValueError, match=r"num_draft_tokens 2 - 1 = 7 exceeds the target's max_len"):
    eagle.sample(model, params, prompt, lengths, jax.random.key(0), config)
  with pytest.raises(ValueError, match="num_draft_tokens"):
    eagle.EagleConfig(num_draft_tokens=0, max_new_tokens=4)
  with pytest.raises(ValueError, match=r"confidence_threshold must be in \[0, 1\]"):
    eagle.EagleConfig(num_draft_tokens=2, max_new_tokens=4, confidence_threshold=1.5)

"""Medusa decoding: the tree drafted from the heads, greedy equality with AR (toy with good and
bad heads, Llama with heads), stopping, per-row randomness and bad input. Its exact target joint
at T = 1 over eight tokens, with a broken residual caught, is in test_long_oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.config import DraftHeadsConfig, ModelConfig
from models.medusa import MedusaLM
from samplers import ar, medusa
from samplers.core.logits import SamplingParams
from tests.models.random_params import random_params
from tests.samplers import oracle, toy
from tests.samplers.test_speculative import _successor
from tests.samplers.toy_drafters import WithHeads

GREEDY = SamplingParams(temperature=0.0)


def test_tree_tokens_take_head_d_top_tokens_at_depth_d():
  heads = jnp.asarray([[[0.0, 3.0, 2.0, 1.0], [5.0, 0.0, 0.0, 4.0]]])  # [B=1, K=2, V=4]
  tokens, qs = medusa.tree_tokens(heads, (2, 2), GREEDY)
  np.testing.assert_array_equal(tokens, [[1, 2, 0, 3, 0, 3]])  # depth 2 repeats under each
  assert qs is None  # point masses
  noise = jax.random.uniform(jax.random.key(0), (1, 2, 4), minval=1e-6)
  tokens, qs = medusa.tree_tokens(heads, (2, 2), SamplingParams(temperature=1.0), noise)
  tokens, qs = np.asarray(tokens[0]), np.asarray(qs[0])
  assert tokens[0] != tokens[1] and list(tokens[2:4]) == list(tokens[4:6])  # distinct siblings
  np.testing.assert_allclose(qs[0], jax.nn.softmax(heads[0, 0]), rtol=1e-5)
  assert qs[1, tokens[0]] == 0 and abs(qs[1].sum() - 1) < 1e-5  # without the first child


@pytest.mark.parametrize("batch, heads", [(1, "oracle"), (8, "oracle"), (3, "random"),
                                          (8, "random")])
def test_equals_greedy_ar_on_a_table_model(batch, heads):
  """`oracle` heads propose the successor model's true continuation (every draft accepted),
  `random` heads mostly wrong ones; both give AR's tokens."""
  vocab = 8
  model = WithHeads(toy.TrigramLM(vocab_size=vocab, max_len=40), 3)
  table = _successor(vocab) + 0.1 * jax.random.normal(jax.random.key(batch), (vocab,) * 3)
  if heads == "oracle":  # head k after token c: c + 1 + k
    head_table = jax.nn.one_hot((jnp.arange(vocab)[:, None] + 2 + jnp.arange(3)) % vocab, vocab)
  else:
    head_table = model.random_heads(jax.random.key(batch + 10))
  params = {"base": table, "heads": 5.0 * head_table}
  rng = np.random.default_rng(batch)
  padded = ar.pad_prompts([rng.integers(0, vocab, rng.integers(1, 6)).tolist()
                           for _ in range(batch)])
  expected = ar.sample(model, params, *padded, jax.random.key(0),
                       ar.ARConfig(max_new_tokens=16, sampling=GREEDY))
  config = medusa.MedusaConfig(branching=(2, 2, 1), max_new_tokens=16, sampling=GREEDY)
  got = medusa.sample(model, params, *padded, jax.random.key(0), config)
  np.testing.assert_array_equal(got.tokens, expected.tokens)
  stats = {k: float(v) for k, v in got.stats.items()}
  if heads == "oracle":
    assert stats["tokens_per_target_call"] > 3.0 and stats["acceptance"] > 0.95, stats
  assert "draft_calls" not in stats and stats["model_calls"] == stats["target_calls"]


def test_equals_greedy_ar_on_a_llama_with_heads():
  config = ModelConfig(vocab_size=32, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2,
                       mlp_dim=64, max_len=48, init_std=0.5, tie_embeddings=False,
                       draft_heads=DraftHeadsConfig(medusa=3))
  model = MedusaLM(config)
  params = random_params(model)
  params["medusa"] = jax.tree.map(lambda w: 0.3 * jax.random.normal(jax.random.key(1), w.shape),
                                  params["medusa"])
  prompts = [[1, 2, 3, 4, 5], [7, 8], [3, 3, 3, 1], [9]]
  padded = ar.pad_prompts(prompts)
  expected = ar.sample(model, params, *padded, jax.random.key(0),
                       ar.ARConfig(max_new_tokens=16, sampling=GREEDY))
  got = medusa.sample(model, params, *padded, jax.random.key(0),
                      medusa.MedusaConfig(branching=(3, 2, 1), max_new_tokens=16,
                                          sampling=GREEDY))
  mismatched = np.flatnonzero(np.any(np.asarray(got.tokens != expected.tokens), axis=1))
  assert mismatched.size <= 1, mismatched  # a float near-tie at most
  assert float(got.stats["target_calls"]) < 16


def test_eos_and_max_new_tokens_stop_rows_independently():
  vocab = 8
  model = WithHeads(toy.TrigramLM(vocab_size=vocab, max_len=24), 2)
  head_table = jax.nn.one_hot((jnp.arange(vocab)[:, None] + 2 + jnp.arange(2)) % vocab, vocab)
  params = {"base": _successor(vocab), "heads": 5.0 * head_table}
  prompt, lengths = ar.pad_prompts([[5], [0, 2], [6], [1]])
  config = medusa.MedusaConfig(branching=(2, 1), max_new_tokens=6, sampling=GREEDY, eos_id=7)
  out = medusa.sample(model, params, prompt, lengths, jax.random.key(0), config)
  np.testing.assert_array_equal(out.tokens, [[6, 7, 0, 0, 0, 0],
                                             [3, 4, 5, 6, 7, 0],
                                             [7, 0, 0, 0, 0, 0],
                                             [2, 3, 4, 5, 6, 7]])
  np.testing.assert_array_equal(out.lengths, [2, 5, 1, 6])


def test_rows_follow_their_keys_whatever_the_batch_order_and_under_vmap():
  model = WithHeads(toy.TOY, 2)
  params = {"base": toy.TARGET, "heads": model.random_heads(jax.random.key(3))}
  prompt, lengths = ar.pad_prompts([[1, 2], [3], [0, 1, 2], [2, 2]])
  config = medusa.MedusaConfig(branching=(2, 1), max_new_tokens=6, eos_id=0)
  run = lambda order, row_keys: medusa.sample(model, params, prompt[order], lengths[order],
                                              row_keys, config)
  oracle.assert_rows_follow_their_keys(run)


def test_bad_input_is_a_clear_error():
  prompt, lengths = ar.pad_prompts([[1, 2]])
  config = medusa.MedusaConfig(branching=(2, 1), max_new_tokens=4)
  with pytest.raises(ValueError, match="needs a target with Medusa heads"):
    medusa.sample(toy.TOY, toy.TARGET, prompt, lengths, jax.random.key(0), config)
  model = WithHeads(toy.TOY, 1)
  params = {"base": toy.TARGET, "heads": model.random_heads(jax.random.key(0))}
  with pytest.raises(ValueError, match=r"depth 2 .* exceeds the target's 1 Medusa heads"):
    medusa.sample(model, params, prompt, lengths, jax.random.key(0), config)
  with pytest.raises(ValueError, match="tree spec malformed"):
    medusa.MedusaConfig(branching=(2, 0), max_new_tokens=4)

"""Lookahead decoding: the n-gram pool, the branch layout, greedy equality with AR (toy and Llama),
stopping, per-row randomness and bad input. Its exact target joint at T = 1 over eight tokens,
with a broken residual caught, is in test_long_oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from samplers import ar, lookahead
from samplers.core import ngram_pool
from samplers.core.logits import SamplingParams
from tests.samplers import llama_pair, oracle, toy
from tests.samplers.test_speculative import LLAMA_PROMPTS, LLAMA_STEPS, _successor

GREEDY = SamplingParams(temperature=0.0)


def test_the_pool_skips_known_ngrams_overwrites_the_oldest_and_selects_the_newest():
  pool = ngram_pool.empty(batch=2, size=3, n=2)
  pool = ngram_pool.insert(pool, jnp.asarray([[[1, 2], [1, 3], [1, 2]],
                                              [[4, 4], [4, 4], [4, 4]]]))
  np.testing.assert_array_equal(pool.clock, [2, 1])  # repeats within one call are skipped
  pool = ngram_pool.insert(pool, jnp.asarray([[[1, 3], [2, 0], [1, 1]],
                                              [[4, 4], [4, 1], [4, 4]]]))
  np.testing.assert_array_equal(pool.clock, [4, 2])  # and so are n-grams already pooled
  drafts, found = ngram_pool.select(pool, jnp.asarray([1, 4]), 3)
  # row 0: [1 2] was overwritten by [1 1] (a ring of 3), so [1 1] then [1 3] start with 1
  np.testing.assert_array_equal(drafts[..., 0], [[1, 3, 0], [1, 4, 0]])
  np.testing.assert_array_equal(found, [[True, True, False], [True, True, False]])
  many = ngram_pool.insert(ngram_pool.empty(1, 2, 2), jnp.asarray([[[5, 1], [5, 2], [5, 3]]]))
  np.testing.assert_array_equal(ngram_pool.select(many, jnp.asarray([5]), 2)[0][..., 0], [[3, 2]])


def test_branches_are_chains_under_the_root():
  parent, depth, ancestors, nodes = lookahead.branches(window=3, chain=2, count=2)
  np.testing.assert_array_equal(parent, [-1, 0, 1, -1, 3, -1, 5])
  np.testing.assert_array_equal(depth, [1, 2, 3, 1, 2, 1, 2])
  np.testing.assert_array_equal(nodes, [[0, 1, 2], [3, 4, -1], [5, 6, -1]])
  assert ancestors[2].tolist() == [True, True, True, False, False, False, False]
  assert ancestors[4].tolist() == [False, False, False, True, True, False, False]


def test_greedy_takes_the_branch_confirmed_longest():
  parent, _, _, nodes = lookahead.branches(window=2, chain=3, count=1)
  tokens = jnp.asarray([7, 0, 7, 8, 9])  # the window (7 0) and the chain (7 8 9)
  top = jnp.asarray([7, 1, 2, 8, 9, 5])  # argmax after root, each node
  count, last, path = lookahead.longest_branch(top, tokens, jnp.ones(5, bool), parent, nodes)
  assert (int(count), int(last)) == (3, 5) and path.tolist() == [2, 3, 4]
  count, last, path = lookahead.longest_branch(top, tokens, jnp.asarray([1, 1, 0, 0, 0], bool),
                                               parent, nodes)
  assert (int(count), int(last)) == (1, 1) and path.tolist() == [0, 0, 0]  # the window's 7


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_equals_greedy_ar_on_a_table_model(batch):
  model = toy.TrigramLM(vocab_size=4, max_len=40)
  params = model.init(jax.random.key(batch), scale=3.0)
  rng = np.random.default_rng(batch)
  prompts = [rng.integers(0, 4, rng.integers(1, 6)).tolist() for _ in range(batch)]
  padded = ar.pad_prompts(prompts)
  expected = ar.sample(model, params, *padded, jax.random.key(0),
                       ar.ARConfig(max_new_tokens=16, sampling=GREEDY))
  config = lookahead.LookaheadConfig(window=3, ngram=3, candidates=2, max_new_tokens=16,
                                     sampling=GREEDY)
  got = lookahead.sample(model, params, *padded, jax.random.key(0), config)
  np.testing.assert_array_equal(got.tokens, expected.tokens)
  stats = {k: float(v) for k, v in got.stats.items()}
  assert stats["tokens_per_target_call"] >= 2.0  # the pool learns the loops greedy decoding makes
  assert "draft_calls" not in stats and stats["model_calls"] == stats["target_calls"]


def test_equals_greedy_ar_on_a_transformer():
  """On the Llama pair's target; mismatches only from a near-tie (at most one)."""
  target = llama_pair.params()[0]
  prompt, lengths = ar.pad_prompts(LLAMA_PROMPTS)
  expected = ar.sample(llama_pair.TARGET, target, prompt, lengths, jax.random.key(0),
                       ar.ARConfig(max_new_tokens=LLAMA_STEPS, sampling=GREEDY))
  config = lookahead.LookaheadConfig(window=3, ngram=3, candidates=2,
                                     max_new_tokens=LLAMA_STEPS, sampling=GREEDY)
  got = lookahead.sample(llama_pair.TARGET, target, prompt, lengths, jax.random.key(0), config)
  ties = llama_pair.near_ties(target, LLAMA_PROMPTS, expected.tokens, got.tokens)
  assert ties <= 1, f"{ties} near-ties"
  assert float(got.stats["tokens_per_target_call"]) > 1.0


def test_eos_and_max_new_tokens_stop_rows_independently():
  model = toy.TrigramLM(vocab_size=8, max_len=24)
  prompt, lengths = ar.pad_prompts([[5], [0, 2], [6], [1]])
  config = lookahead.LookaheadConfig(window=2, ngram=2, candidates=2, max_new_tokens=6,
                                     sampling=GREEDY, eos_id=7, pad_id=0)
  out = lookahead.sample(model, _successor(8), prompt, lengths, jax.random.key(0), config)
  np.testing.assert_array_equal(out.tokens, [[6, 7, 0, 0, 0, 0],
                                             [3, 4, 5, 6, 7, 0],
                                             [7, 0, 0, 0, 0, 0],
                                             [2, 3, 4, 5, 6, 7]])
  np.testing.assert_array_equal(out.lengths, [2, 5, 1, 6])


def test_rows_follow_their_keys_whatever_the_batch_order_and_under_vmap():
  prompt, lengths = ar.pad_prompts([[1, 2], [3], [0, 1, 2], [2, 2]])
  config = lookahead.LookaheadConfig(window=2, ngram=2, candidates=2, max_new_tokens=6, eos_id=0)
  run = lambda order, row_keys: lookahead.sample(toy.TOY, toy.TARGET, prompt[order],
                                                 lengths[order], row_keys, config)
  oracle.assert_rows_follow_their_keys(run)


def test_bad_input_is_a_clear_error():
  with pytest.raises(ValueError, match="ngram must be >= 2"):
    lookahead.LookaheadConfig(window=2, ngram=1, candidates=2, max_new_tokens=4)
  with pytest.raises(ValueError, match="window, candidates and pool_size must be >= 1"):
    lookahead.LookaheadConfig(window=0, ngram=2, candidates=2, max_new_tokens=4)
  prompt, lengths = ar.pad_prompts([[1] * 8])
  with pytest.raises(ValueError, match=r"window 2 \+ candidates 2 x \(ngram 3 - 1\) = 17 exceeds "
                                       r"the target's max_len 16"):
    lookahead.sample(toy.TOY, toy.TARGET, prompt, lengths, jax.random.key(0),
                     lookahead.LookaheadConfig(window=2, ngram=3, candidates=2, max_new_tokens=4))

"""Prompt lookup decoding: the n-gram lookup, greedy equality with AR (toy and Llama), stopping,
per-row randomness and bad input. Its exact target joint at T = 1 over eight tokens, with a broken
residual caught, is in test_long_oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from samplers import ar, prompt_lookup
from samplers.core.logits import SamplingParams
from tests.samplers import llama_pair, oracle, toy
from tests.samplers.test_speculative import LLAMA_PROMPTS, LLAMA_STEPS, _successor

GREEDY = SamplingParams(temperature=0.0)


def test_lookup_copies_what_followed_the_latest_longest_match():
  seq = jnp.asarray([[1, 2, 3, 4, 1, 2, 3, 9, 9, 0, 0, 0],
                     [5, 6, 5, 6, 5, 0, 0, 0, 0, 0, 0, 0],
                     [1, 2, 1, 3, 1, 2, 0, 0, 0, 0, 0, 0]], jnp.int32)
  drafts, matched = prompt_lookup.lookup(seq, jnp.asarray([7, 5, 6]), 4, 3, 1)
  # row 0: [1 2 3] recurs at 0, followed by 4 1 2 3 (read periodically from slot 3)
  # row 1: [5 6 5] at 0; the continuation 6 5 runs into the suffix and repeats with period 2
  # row 2: [3 1 2] does not recur, [1 2] does at 0, followed by 1 3 (then periodic: 1 2)
  np.testing.assert_array_equal(drafts, [[4, 1, 2, 3], [6, 5, 6, 5], [1, 3, 1, 2]])
  np.testing.assert_array_equal(matched, [3, 3, 2])
  drafts, matched = prompt_lookup.lookup(seq, jnp.asarray([6, 2, 3]), 3, 2, 2)
  np.testing.assert_array_equal(matched, [2, 0, 0])  # [5 6] has no earlier occurrence in row 1
  np.testing.assert_array_equal(drafts, [[3, 4, 1], [6, 6, 6], [1, 1, 1]])  # else: the last token


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_equals_greedy_ar_on_a_table_model(batch):
  model = toy.TrigramLM(vocab_size=4, max_len=24)
  params = model.init(jax.random.key(batch), scale=3.0)
  rng = np.random.default_rng(batch)
  prompts = [rng.integers(0, 4, rng.integers(1, 6)).tolist() for _ in range(batch)]
  padded = ar.pad_prompts(prompts)
  expected = ar.sample(model, params, *padded, jax.random.key(0),
                       ar.ARConfig(max_new_tokens=12, sampling=GREEDY))
  config = prompt_lookup.PromptLookupConfig(num_draft_tokens=4, max_new_tokens=12,
                                            sampling=GREEDY)
  got = prompt_lookup.sample(model, params, *padded, jax.random.key(0), config)
  np.testing.assert_array_equal(got.tokens, expected.tokens)
  stats = {k: float(v) for k, v in got.stats.items()}
  assert stats["accepted_tokens"] > 0 and stats["target_calls"] < 12  # loops get copied
  assert "draft_calls" not in stats and stats["model_calls"] == stats["target_calls"]


def test_equals_greedy_ar_on_a_transformer():
  """On the Llama pair's target; mismatches only from a near-tie (at most one)."""
  target = llama_pair.params()[0]
  prompt, lengths = ar.pad_prompts(LLAMA_PROMPTS)
  expected = ar.sample(llama_pair.TARGET, target, prompt, lengths, jax.random.key(0),
                       ar.ARConfig(max_new_tokens=LLAMA_STEPS, sampling=GREEDY))
  config = prompt_lookup.PromptLookupConfig(num_draft_tokens=3, max_new_tokens=LLAMA_STEPS,
                                            sampling=GREEDY)
  got = prompt_lookup.sample(llama_pair.TARGET, target, prompt, lengths, jax.random.key(0), config)
  ties = llama_pair.near_ties(target, LLAMA_PROMPTS, expected.tokens, got.tokens)
  assert ties <= 1, f"{ties} near-ties"
  assert float(got.stats["tokens_per_target_call"]) > 1.0


def test_eos_and_max_new_tokens_stop_rows_independently():
  model = toy.TrigramLM(vocab_size=8, max_len=16)
  prompt, lengths = ar.pad_prompts([[5], [0, 2], [6], [1, 2, 3, 4, 5, 6, 0, 1]])
  config = prompt_lookup.PromptLookupConfig(num_draft_tokens=3, max_new_tokens=6,
                                            sampling=GREEDY, eos_id=7, pad_id=0)
  out = prompt_lookup.sample(model, _successor(8), prompt, lengths, jax.random.key(0), config)
  np.testing.assert_array_equal(out.tokens, [[6, 7, 0, 0, 0, 0],
                                             [3, 4, 5, 6, 7, 0],
                                             [7, 0, 0, 0, 0, 0],
                                             [2, 3, 4, 5, 6, 7]])
  np.testing.assert_array_equal(out.lengths, [2, 5, 1, 6])
  assert int(out.stats["accepted_tokens"]) >= 3  # the last row copies 2 3 4 from its prompt


def test_rows_follow_their_keys_whatever_the_batch_order_and_under_vmap():
  prompt, lengths = ar.pad_prompts([[1, 2], [3], [0, 1, 2], [2, 2]])
  config = prompt_lookup.PromptLookupConfig(num_draft_tokens=3, max_new_tokens=6, eos_id=0)
  run = lambda order, row_keys: prompt_lookup.sample(toy.TOY, toy.TARGET, prompt[order],
                                                     lengths[order], row_keys, config)
  oracle.assert_rows_follow_their_keys(run)


def test_bad_input_is_a_clear_error():
  with pytest.raises(ValueError, match="need 1 <= min_ngram <= max_ngram"):
    prompt_lookup.PromptLookupConfig(num_draft_tokens=3, max_new_tokens=4, min_ngram=3,
                                     max_ngram=2)
  with pytest.raises(ValueError, match="num_draft_tokens"):
    prompt_lookup.PromptLookupConfig(num_draft_tokens=0, max_new_tokens=4)
  prompt, lengths = ar.pad_prompts([[1] * 10])
  with pytest.raises(ValueError, match=r"= 17 exceeds the target's max_len 16"):
    prompt_lookup.sample(toy.TOY, toy.TARGET, prompt, lengths, jax.random.key(0),
                         prompt_lookup.PromptLookupConfig(num_draft_tokens=4, max_new_tokens=4))

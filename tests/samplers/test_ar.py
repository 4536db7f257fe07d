"""AR sampler: greedy exactness against full forwards, stopping, batching, randomness."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.causal_lm import CausalLM
from models.config import ModelConfig
from samplers import ar
from samplers.core.logits import SamplingParams, probs, sample_token
from tests.models.random_params import random_params
from tests.samplers import toy
from tests.samplers.stats import chi_square, chi_square_quantile

GREEDY = SamplingParams(temperature=0.0)
# Untied and a large init: a small random tied model mostly repeats its last token under greedy.
LLAMA = CausalLM(ModelConfig(vocab_size=32, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2,
                             mlp_dim=64, max_len=24, init_std=0.5, tie_embeddings=False))
TOY = toy.TrigramLM(vocab_size=4, max_len=16)


@pytest.fixture(scope="module")
def llama_params():
  return random_params(LLAMA)


@pytest.fixture(scope="module")
def toy_params():
  return TOY.init(jax.random.key(1))


GREEDY_PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [3, 3, 3, 1]]
GREEDY_CONFIG = ar.ARConfig(max_new_tokens=10, sampling=GREEDY)


@pytest.fixture(scope="module")
def greedy_batch(llama_params):
  """Greedy AR over a ragged batch of three prompts."""
  return ar.sample(LLAMA, llama_params, *ar.pad_prompts(GREEDY_PROMPTS), jax.random.key(0),
                   GREEDY_CONFIG)


def test_greedy_matches_a_naive_argmax_loop_over_full_forwards(llama_params, greedy_batch):
  """Token for token, except at near-ties (top-two logits within 1e-4), which are counted."""
  steps = GREEDY_CONFIG.max_new_tokens
  full = jax.jit(LLAMA.logits)
  ties = 0
  for row, tokens in enumerate(GREEDY_PROMPTS):
    seq = np.zeros((1, len(GREEDY_PROMPTS[0]) + steps), np.int32)  # causal: right padding is inert
    seq[0, :len(tokens)] = tokens
    for t in range(steps):
      logits = np.asarray(full(llama_params, jnp.asarray(seq)))[0, len(tokens) + t - 1]
      best, runner_up = np.sort(logits)[::-1][:2]
      if greedy_batch.tokens[row, t] != np.argmax(logits):
        assert best - runner_up < 1e-4, (row, t)
        ties += 1
        break  # the continuations differ from here on
      seq[0, len(tokens) + t] = np.argmax(logits)
  assert ties <= 1, f"{ties} near-ties"
  np.testing.assert_array_equal(greedy_batch.lengths, [steps] * 3)
  assert int(greedy_batch.stats["model_calls"]) == steps  # prefill + steps - 1 decode calls
  assert int(greedy_batch.stats["generated_tokens"]) == 3 * steps


def test_a_padded_prompt_decodes_as_if_alone(llama_params, greedy_batch):
  """The short, right-padded row of the batch equals that prompt decoded alone, unpadded."""
  alone = ar.sample(LLAMA, llama_params, *ar.pad_prompts(GREEDY_PROMPTS[1:2]), jax.random.key(0),
                    GREEDY_CONFIG)
  np.testing.assert_array_equal(greedy_batch.tokens[1], alone.tokens[0])


def test_a_rows_samples_do_not_depend_on_the_rest_of_the_batch(toy_params):
  prompt, lengths = ar.pad_prompts([[1, 2], [3], [0, 1, 2], [2, 2]])
  keys = jax.random.split(jax.random.key(4), 4)
  config = ar.ARConfig(max_new_tokens=6)
  batch = ar.sample(TOY, toy_params, prompt, lengths, keys, config)
  alone = ar.sample(TOY, toy_params, prompt[2:3], lengths[2:3], keys[2:3], config)
  np.testing.assert_array_equal(batch.tokens[2], alone.tokens[0])
  raw = ar.sample(TOY, toy_params, prompt, lengths, jax.random.key_data(keys), config)
  np.testing.assert_array_equal(raw.tokens, batch.tokens)


def test_tokens_are_drawn_with_the_row_key_folded_with_their_absolute_position(toy_params):
  prompt, lengths = ar.pad_prompts([[1, 2], [3]])
  keys = jax.random.split(jax.random.key(8), 2)
  out = ar.sample(TOY, toy_params, prompt, lengths, keys, ar.ARConfig(max_new_tokens=2))
  for row in range(2):
    history = [int(t) for t in prompt[row, :lengths[row]]] + [int(out.tokens[row, 0])]
    for t in range(2):
      context = history[:lengths[row] + t]
      logits = toy_params[context[-2] if len(context) > 1 else 0, context[-1]]
      key = jax.random.fold_in(keys[row], len(context))
      assert out.tokens[row, t] == sample_token(key, logits, SamplingParams())


def test_one_key_gives_identical_prompts_different_samples(toy_params):
  prompt, lengths = ar.pad_prompts([[1, 2]] * 8)
  config = ar.ARConfig(max_new_tokens=6)
  out = ar.sample(TOY, toy_params, prompt, lengths, jax.random.key(5), config)
  assert len({tuple(row) for row in np.asarray(out.tokens)}) > 1


def _successor_table(vocab):
  """A toy table whose greedy continuation of token c is c + 1 (mod vocab)."""
  table = np.zeros((vocab,) * 3, np.float32)
  table[:, np.arange(vocab), (np.arange(vocab) + 1) % vocab] = 5.0
  return jnp.asarray(table)


def test_eos_stops_rows_independently_and_pads_after():
  model = toy.TrigramLM(vocab_size=8, max_len=16)
  prompt, lengths = ar.pad_prompts([[5], [0, 2], [6]])
  config = ar.ARConfig(max_new_tokens=6, sampling=GREEDY, eos_id=7, pad_id=0)
  out = ar.sample(model, _successor_table(8), prompt, lengths, jax.random.key(0), config)
  np.testing.assert_array_equal(out.tokens, [[6, 7, 0, 0, 0, 0],
                                             [3, 4, 5, 6, 7, 0],
                                             [7, 0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(out.lengths, [2, 5, 1])
  assert int(out.stats["model_calls"]) == 5  # stops once the slowest row is done
  assert int(out.stats["generated_tokens"]) == 8


def test_vmap_over_keys_equals_separate_calls(toy_params):
  prompt, lengths = ar.pad_prompts([[1, 2], [3]])
  config = ar.ARConfig(max_new_tokens=6, eos_id=0, pad_id=0)
  keys = jax.random.split(jax.random.key(6), 3)
  many = jax.vmap(lambda k: ar.sample(TOY, toy_params, prompt, lengths, k, config))(keys)
  assert many.tokens.shape == (3, 2, 6)
  for i, key in enumerate(keys):
    one = ar.sample(TOY, toy_params, prompt, lengths, key, config)
    np.testing.assert_array_equal(many.tokens[i], one.tokens)
    np.testing.assert_array_equal(many.lengths[i], one.lengths)


@pytest.mark.parametrize("sampling", [SamplingParams(temperature=1.0),
                                      SamplingParams(temperature=0.8, top_k=3, top_p=0.9)])
def test_joint_of_three_tokens_matches_the_exact_joint(toy_params, sampling):
  """20k rows per prompt, two prompt lengths in one batch; chi-square against brute force over
  all 64 continuations at the 0.9999 quantile. Power: a 0.01 error on a continuation of mass
  ~0.02 adds about 100 to the statistic."""
  prompts = [[1, 2], [3]]
  rows = 20_000
  prompt, lengths = ar.pad_prompts([p for p in prompts for _ in range(rows)])
  out = ar.sample(TOY, toy_params, prompt, lengths, jax.random.key(7),
                  ar.ARConfig(max_new_tokens=3, sampling=sampling))
  dist = lambda logits: np.asarray(probs(jnp.asarray(logits, jnp.float32), sampling))
  for i, tokens in enumerate(prompts):
    drawn = np.asarray(out.tokens[i * rows:(i + 1) * rows])
    counts = np.bincount(np.ravel_multi_index(drawn.T, (4, 4, 4)), minlength=64)
    stat, dof = chi_square(counts, toy.exact_joint(toy_params, tokens, 3, dist))
    assert stat < chi_square_quantile(dof), (tokens, stat, dof)


def test_prompt_too_long_for_the_model_is_a_clear_error(toy_params):
  prompt, lengths = ar.pad_prompts([[1] * 12])
  with pytest.raises(ValueError, match=r"prompt length 12 \+ max_new_tokens 5 = 17 exceeds the "
                                       r"model's max_len 16"):
    ar.sample(TOY, toy_params, prompt, lengths, jax.random.key(0), ar.ARConfig(max_new_tokens=5))


def test_bad_arguments_are_rejected():
  with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
    ar.ARConfig(max_new_tokens=0)
  with pytest.raises(ValueError, match="no empty prompt"):
    ar.pad_prompts([[1], []])
  prompt, lengths = ar.pad_prompts([[1], [2]])
  three_keys = jax.random.split(jax.random.key(0), 3)
  with pytest.raises(ValueError, match="one key per row"):
    ar.sample(TOY, TOY.init(jax.random.key(0)), prompt, lengths, three_keys,
              ar.ARConfig(max_new_tokens=2))

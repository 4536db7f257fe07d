"""Jacobi decoding equals greedy AR token for token, for any batch composition."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from samplers import ar, jacobi
from samplers.core.logits import SamplingParams
from tests.samplers.test_ar import GREEDY_PROMPTS, LLAMA, TOY, llama_params  # noqa: F401


def _ar(model, params, prompts, steps=10, eos=None):
  config = ar.ARConfig(max_new_tokens=steps, sampling=SamplingParams(temperature=0.0), eos_id=eos)
  return ar.sample(model, params, *ar.pad_prompts(prompts), jax.random.key(0), config)


def _jacobi(model, params, prompts, block, steps=10, eos=None):
  config = jacobi.JacobiConfig(block_size=block, max_new_tokens=steps, eos_id=eos)
  return jacobi.sample(model, params, *ar.pad_prompts(prompts), jax.random.key(0), config)


@pytest.mark.parametrize("block", [2, 3, 6])
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_equals_greedy_ar_on_a_table_model(block, batch):
  params = TOY.init(jax.random.key(batch + block), scale=3.0)
  rng = np.random.default_rng(batch)
  prompts = [rng.integers(0, TOY.vocab_size, rng.integers(1, 4)).tolist() for _ in range(batch)]
  expected = _ar(TOY, params, prompts, steps=8)
  got = _jacobi(TOY, params, prompts, block, steps=8)
  np.testing.assert_array_equal(got.tokens, expected.tokens)
  np.testing.assert_array_equal(got.lengths, expected.lengths)
  assert 1 <= int(got.stats["target_calls"]) <= 8


def test_equals_greedy_ar_on_a_transformer(llama_params):  # noqa: F811
  expected = _ar(LLAMA, llama_params, GREEDY_PROMPTS)
  got = _jacobi(LLAMA, llama_params, GREEDY_PROMPTS, block=4)
  full = jax.jit(LLAMA.logits)
  for row, prompt in enumerate(GREEDY_PROMPTS):
    mismatch = np.flatnonzero(np.asarray(got.tokens[row] != expected.tokens[row]))
    if mismatch.size:  # allowed only right after a near-tie of the target's top two logits
      t = int(mismatch[0])
      seq = jnp.asarray([prompt + expected.tokens[row, :t].tolist()], jnp.int32)
      best, runner_up = np.sort(np.asarray(full(llama_params, seq))[0, -1])[::-1][:2]
      assert best - runner_up < 1e-4, (row, t)
  stats = {k: float(v) for k, v in got.stats.items()}
  assert stats["generated_tokens"] == 30
  assert stats["tokens_per_target_call"] >= 1.0
  assert stats["iterations"] <= 27 and stats["iterations_per_block"] <= 4.0


def test_a_chain_the_guesses_already_hold_converges_in_one_call():
  """A model that repeats its last token: the initial guesses (copies of it) are all right."""
  vocab = 5
  table = jnp.full((vocab, vocab, vocab), -10.0).at[:, jnp.arange(vocab), jnp.arange(vocab)].set(10.0)
  got = _jacobi(TOY.__class__(vocab, 32), table, [[1, 2]], block=6, steps=11)
  np.testing.assert_array_equal(got.tokens[0], [2] * 11)
  assert int(got.stats["iterations"]) == 2  # 1 + 6 + 4 tokens: prefill, then two calls


def test_eos_stops_rows_independently():
  vocab = 6
  successor = (jnp.arange(vocab) + 1) % vocab  # next token = current + 1; eos = 5
  table = jnp.full((vocab, vocab, vocab), -10.0).at[:, jnp.arange(vocab), successor].set(10.0)
  model = TOY.__class__(vocab, 32)
  got = _jacobi(model, table, [[1], [3], [0]], block=3, steps=8, eos=5)
  expected = _ar(model, table, [[1], [3], [0]], steps=8, eos=5)
  np.testing.assert_array_equal(got.tokens, expected.tokens)
  np.testing.assert_array_equal(got.lengths, [4, 2, 5])


def test_bad_arguments():
  with pytest.raises(ValueError, match="block_size must be >= 2"):
    jacobi.JacobiConfig(block_size=1, max_new_tokens=4)
  with pytest.raises(ValueError, match="exceeds the model's max_len 16"):
    _jacobi(TOY, TOY.init(jax.random.key(0)), [[1, 2]], block=4, steps=13)

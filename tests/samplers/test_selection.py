"""Selection rules: best-of-n, votes, MBR, first-finish; the log-likelihood scorer against a
direct computation; wrong scorer shapes are clear errors."""

import jax
import numpy as np
import pytest

from samplers import selection
from tests.samplers import toy

EOS = 3


def test_best_of_n_and_scorer_shape():
  tokens, lengths = np.zeros((2, 3, 4), np.int32), np.full((2, 3), 4)
  scores = selection.score(lambda t, l: np.array([[0.0, 2.0, 1.0], [np.nan, -1.0, -1.0]]),
                           tokens, lengths)
  np.testing.assert_array_equal(selection.best_of_n(scores), [1, 1])  # NaN never wins; ties: first
  with pytest.raises(ValueError, match=r"shape \(6,\).*\[B, n\] = \(2, 3\)"):
    selection.score(lambda t, l: np.zeros(6), tokens, lengths)
  with pytest.raises(ValueError, match=r"tokens \[B, n, N\]"):
    selection.score(lambda t, l: np.zeros((2, 3)), tokens[0], lengths)


def test_votes():
  answers = [["7", "8", "8", None], [None, None, None, None], ["1", "2", "2", "1"]]
  np.testing.assert_array_equal(selection.majority_vote(answers), [1, 0, 0])  # tie: seen first
  weights = np.array([[5.0, 1.0, 1.0, 9.0], [1, 1, 1, 1], [0.1, 0.1, 0.1, 0.5]])
  np.testing.assert_array_equal(selection.weighted_vote(answers, weights), [0, 0, 0])
  with pytest.raises(ValueError, match="non-negative"):
    selection.weighted_vote(answers, -weights)
  with pytest.raises(ValueError, match=r"weights must be \[B, n\]"):
    selection.weighted_vote(answers, weights[:2])
  w = selection.perplexity_weights(np.array([[-2.0, -8.0]]), np.array([[2, 4]]))
  np.testing.assert_allclose(w, [[np.exp(-1.0), np.exp(-2.0)]])


def test_mbr_and_first_finish():
  a, b, c = np.array([1, 2, 3]), np.array([1, 2, 4]), np.array([5, 6])
  assert selection.token_f1(a, b) == pytest.approx(2 / 3)
  assert selection.token_f1(a, c) == 0.0 and selection.exact_match(a, a) == 1.0
  np.testing.assert_array_equal(selection.mbr([[c, a, b]], selection.token_f1), [1])
  tokens = np.array([[[5, 5, 5, 5], [5, EOS, 0, 0], [EOS, 0, 0, 0]],
                     [[5, 5, 5, 5], [6, 6, 6, 6], [5, 5, 5, 0]]])
  lengths = np.array([[4, 2, 1], [4, 4, 3]])
  np.testing.assert_array_equal(selection.first_finish(tokens, lengths, EOS), [2, 2])
  chosen, chosen_lengths = selection.take(tokens, lengths, np.array([1, 0]))
  np.testing.assert_array_equal(chosen_lengths, [2, 4])
  assert [list(x) for x in selection.completions(tokens, lengths, EOS)[0]] == [[5] * 4, [5], []]


def test_log_likelihood_scorer_matches_the_tabular_model():
  model = toy.TrigramLM(vocab_size=4, max_len=12)
  table = model.init(jax.random.key(0))
  prompt, prompt_lengths = np.array([[1, 2], [3, 0]], np.int32), np.array([2, 1], np.int32)
  tokens = np.array([[[0, 1, 2], [3, 3, 0]], [[2, 2, 2], [1, 0, 0]]], np.int32)
  lengths = np.array([[3, 2], [3, 1]])
  scores = selection.score(selection.log_likelihood(model, table, prompt, prompt_lengths),
                           tokens, lengths)
  table = np.asarray(table, np.float64)
  for b in range(2):
    for i in range(2):
      seq = [*prompt[b, :prompt_lengths[b]], *tokens[b, i, :lengths[b, i]]]
      expected = 0.0
      for t in range(prompt_lengths[b], len(seq)):
        previous = seq[t - 2] if t >= 2 else 0
        logits = table[previous, seq[t - 1]]
        expected += logits[seq[t]] - np.log(np.sum(np.exp(logits)))
      assert scores[b, i] == pytest.approx(expected, abs=1e-4)

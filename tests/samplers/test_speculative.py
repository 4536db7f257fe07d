"""Speculative sampling: exact target joint (oracle, with a broken verifier caught), closed-form
acceptance, greedy equality with AR on a Llama pair, stopping, batching, randomness, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from samplers import ar, speculative
from samplers.core import verify
from samplers.core.logits import SamplingParams
from tests.samplers import llama_pair, oracle, toy
from tests.samplers.oracle import POWER, SIGNIFICANCE, distribution, p_value
from tests.samplers.toy import DRAFT, ORACLE_PROMPTS, ORACLE_ROWS, ORACLE_STEPS, TARGET, TOY, VOCAB

GREEDY = SamplingParams(temperature=0.0)


def _oracle_p_values(config, seed=0):
  """p-value per prompt of ORACLE_ROWS samples each (one batch) against the exact joint."""
  prompt, lengths = ar.pad_prompts([p for p in ORACLE_PROMPTS for _ in range(ORACLE_ROWS)])
  out = speculative.sample(TOY, TARGET, TOY, DRAFT, prompt, lengths, jax.random.key(seed), config)
  tokens = np.asarray(out.tokens).reshape(len(ORACLE_PROMPTS), ORACLE_ROWS, ORACLE_STEPS)
  return [p_value(rows, toy.exact_joint(TARGET, prompt_tokens, ORACLE_STEPS,
                                        distribution(config.sampling), config.eos_id,
                                        config.pad_id))[0]
          for prompt_tokens, rows in zip(ORACLE_PROMPTS, tokens)]


ORACLE_CONFIGS = [  # the first, at T = 1, is checked over 8 tokens in test_long_oracle
    speculative.SpeculativeConfig(num_draft_tokens=3, max_new_tokens=ORACLE_STEPS),
    speculative.SpeculativeConfig(num_draft_tokens=2, max_new_tokens=ORACLE_STEPS, eos_id=0,
                                  sampling=SamplingParams(temperature=0.7, top_k=3, top_p=0.9)),
    # gamma past the last needed token: drafts beyond max_new_tokens are scored and dropped.
    speculative.SpeculativeConfig(num_draft_tokens=5, max_new_tokens=ORACLE_STEPS,
                                  sampling=SamplingParams(temperature=1.5, top_p=0.8)),
]


@pytest.mark.slow
@pytest.mark.parametrize("config", ORACLE_CONFIGS[1:], ids=["t0.7-k3-p0.9-eos-g2", "t1.5-p0.8-g5"])
def test_joint_matches_the_exact_target_joint(config):
  """100k samples per prompt; Pearson chi-square over the 625 continuations (pooled below 5
  expected); a correct sampler gives p > 1e-3 (fixed seed)."""
  assert min(_oracle_p_values(config)) > SIGNIFICANCE


@pytest.mark.slow
def test_a_verifier_that_resamples_from_p_after_a_rejection_fails_the_oracle(fresh_trace):
  """Power: drawing from p instead of norm(max(0, p - q)) after a rejection is caught."""
  fresh_trace.setattr(verify, "residual", lambda p, q: p)
  assert max(_oracle_p_values(ORACLE_CONFIGS[0])) < POWER


def test_acceptance_and_tokens_per_call_match_the_closed_form_on_context_free_tables():
  """Per-token acceptance a = sum(min(p, q)); tokens per round (1 - a^(g+1)) / (1 - a);
  both within 5 standard errors."""
  rng = np.random.default_rng(0)
  target, draft = (toy.context_free(rng.normal(0, 1.0, VOCAB)) for _ in range(2))
  p, q = (np.asarray(jax.nn.softmax(t[0, 0]), np.float64) for t in (target, draft))
  a, gamma = np.minimum(p, q).sum(), 3
  prompt, lengths = ar.pad_prompts([[1]] * 2000)
  config = speculative.SpeculativeConfig(num_draft_tokens=gamma, max_new_tokens=12)
  stats = speculative.sample(TOY, target, TOY, draft, prompt, lengths, jax.random.key(3),
                             config).stats
  accepted, rejections = int(stats["accepted_tokens"]), int(stats["rejections"])
  rounds = int(stats["drafted_tokens"]) // gamma
  tried = accepted + rejections
  assert abs(accepted / tried - a) < 5 * np.sqrt(a * (1 - a) / tried)
  per_round = np.append(a ** np.arange(gamma) * (1 - a), a ** gamma)  # P(m = 0..gamma)
  emitted = np.arange(1, gamma + 2)
  mean, var = per_round @ emitted, per_round @ emitted ** 2 - (per_round @ emitted) ** 2
  np.testing.assert_allclose(mean, (1 - a ** (gamma + 1)) / (1 - a))
  assert abs(1 + accepted / rounds - mean) < 5 * np.sqrt(var / rounds)


LLAMA_PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [3, 3, 3, 1], [9], [10, 11, 12], [4, 4],
                 [20, 21, 22, 23, 24, 25], [31]]
LLAMA_STEPS = 16


@pytest.fixture(scope="module")
def pair_params():
  return llama_pair.params()


@pytest.fixture(scope="module")
def greedy_ar(pair_params):
  prompt, lengths = ar.pad_prompts(LLAMA_PROMPTS)
  return ar.sample(llama_pair.TARGET, pair_params[0], prompt, lengths, jax.random.key(0),
                   ar.ARConfig(max_new_tokens=LLAMA_STEPS, sampling=GREEDY))


@pytest.mark.parametrize("batch", [pytest.param(1, marks=pytest.mark.slow),
                                   pytest.param(3, marks=pytest.mark.slow), 8])
def test_greedy_equals_greedy_ar_token_for_token(pair_params, greedy_ar, batch):
  """On a Llama pair with mixed acceptance; mismatches only from a near-tie (at most one)."""
  target, draft = pair_params
  prompt, lengths = ar.pad_prompts(LLAMA_PROMPTS[:batch])
  config = speculative.SpeculativeConfig(num_draft_tokens=4, max_new_tokens=LLAMA_STEPS,
                                         sampling=GREEDY)
  out = speculative.sample(llama_pair.TARGET, target, llama_pair.DRAFT, draft, prompt, lengths,
                           jax.random.key(0), config)
  ties = llama_pair.near_ties(target, LLAMA_PROMPTS, greedy_ar.tokens[:batch], out.tokens)
  assert ties <= 1, f"{ties} near-ties"
  np.testing.assert_array_equal(out.lengths, [LLAMA_STEPS] * batch)
  stats = {name: float(value) for name, value in out.stats.items()}
  assert 0 < stats["acceptance"] < 1 and stats["rejections"] > 0  # mixed acceptance lengths
  assert stats["target_calls"] < LLAMA_STEPS
  assert stats["generated_tokens"] == batch * LLAMA_STEPS


def _successor(vocab, shift=1):
  """A toy table whose greedy continuation of token c is c + shift (mod vocab)."""
  table = np.zeros((vocab,) * 3, np.float32)
  table[:, np.arange(vocab), (np.arange(vocab) + shift) % vocab] = 5.0
  return jnp.asarray(table)


def test_eos_and_max_new_tokens_stop_rows_independently_and_pad_after():
  model = toy.TrigramLM(vocab_size=8, max_len=16)
  draft = _successor(8).at[:, 3].set(_successor(8, shift=2)[:, 3])  # wrong after token 3
  prompt, lengths = ar.pad_prompts([[5], [0, 2], [6], [1]])
  config = speculative.SpeculativeConfig(num_draft_tokens=3, max_new_tokens=6, sampling=GREEDY,
                                         eos_id=7, pad_id=0)
  out = speculative.sample(model, _successor(8), model, draft, prompt, lengths,
                           jax.random.key(0), config)
  np.testing.assert_array_equal(out.tokens, [[6, 7, 0, 0, 0, 0],
                                             [3, 4, 5, 6, 7, 0],
                                             [7, 0, 0, 0, 0, 0],
                                             [2, 3, 4, 5, 6, 7]])
  np.testing.assert_array_equal(out.lengths, [2, 5, 1, 6])
  stats = {name: int(value) for name, value in out.stats.items() if name != "acceptance"}
  assert stats["generated_tokens"] == 14 and stats["model_calls"] == stats["target_calls"]
  assert stats["draft_calls"] == 1 + 3 * (stats["target_calls"] - 1)


def test_rows_follow_their_keys_whatever_the_batch_order_and_under_vmap():
  prompt, lengths = ar.pad_prompts([[1, 2], [3], [0, 1, 2], [2, 2]])
  config = speculative.SpeculativeConfig(num_draft_tokens=3, max_new_tokens=6, eos_id=0)
  run = lambda order, row_keys: speculative.sample(TOY, TARGET, TOY, DRAFT, prompt[order],
                                                   lengths[order], row_keys, config)
  oracle.assert_rows_follow_their_keys(run)


def test_bad_input_is_a_clear_error():
  prompt, lengths = ar.pad_prompts([[1] * 10])
  config = speculative.SpeculativeConfig(num_draft_tokens=3, max_new_tokens=4)
  with pytest.raises(ValueError, match="draft's vocab_size 6 differs from the target's "
                                       "vocab_size 5"):
    other = toy.TrigramLM(vocab_size=6, max_len=16)
    speculative.sample(TOY, TARGET, other, other.init(jax.random.key(0)), prompt, lengths,
                       jax.random.key(0), config)
  with pytest.raises(ValueError, match=r"prompt length 10 \+ max_new_tokens 4 \+ num_draft_tokens "
                                       r"3 - 1 = 16 exceeds the draft's max_len 15"):
    short = toy.TrigramLM(vocab_size=VOCAB, max_len=15)
    speculative.sample(TOY, TARGET, short, DRAFT, prompt, lengths, jax.random.key(0), config)
  with pytest.raises(ValueError, match=r"= 17 exceeds the target's max_len 16"):
    speculative.sample(TOY, TARGET, TOY, DRAFT, prompt, lengths, jax.random.key(0),
                       speculative.SpeculativeConfig(num_draft_tokens=4, max_new_tokens=4))
  with pytest.raises(ValueError, match=r"num_draft_tokens \(gamma\) must be >= 1, got 0"):
    speculative.SpeculativeConfig(num_draft_tokens=0, max_new_tokens=4)
  with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
    speculative.SpeculativeConfig(num_draft_tokens=2, max_new_tokens=0)
  with pytest.raises(ValueError, match="temperature must be >= 0"):
    speculative.SpeculativeConfig(num_draft_tokens=2, max_new_tokens=4,
                                  sampling=SamplingParams(temperature=-0.5))
  for top_p in (0.0, 1.5):
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
      speculative.SpeculativeConfig(num_draft_tokens=2, max_new_tokens=4,
                                    sampling=SamplingParams(top_p=top_p))

"""Adaptive draft length: exact target joint under both stopping rules (oracle, with a broken
verifier caught), greedy equality with AR on a Llama pair, draft calls saved at identical output,
a never-stopping rule is speculative sampling, batching and vmap, bad input."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.acceptance_head import AcceptanceDraftLM
from models.config import DraftHeadsConfig
from samplers import adaptive, ar, speculative
from samplers.core import verify
from samplers.core.logits import SamplingParams
from tests.models.random_params import random_params
from tests.samplers import llama_pair, oracle, toy
from tests.samplers.oracle import POWER, SIGNIFICANCE, distribution, p_value
from tests.samplers.toy import DRAFT, ORACLE_PROMPTS, ORACLE_ROWS, ORACLE_STEPS, TARGET, TOY, VOCAB

GREEDY = SamplingParams(temperature=0.0)


@dataclasses.dataclass(frozen=True)
class HeadTrigramLM(toy.TrigramLM):
  """A trigram draft with an acceptance head: params (table [V, V, V], head [V, V]); the
  acceptance logit after a token is head[previous, current], read along the same attention path
  as the next-token logits."""

  def apply(self, params, tokens, positions, cache, attention_mask=None):
    return super().apply(params[0], tokens, positions, cache, attention_mask)

  def apply_with_acceptance(self, params, tokens, positions, cache):
    head = jnp.broadcast_to(params[1][..., None], (self.vocab_size,) * 3)
    acceptance, _ = super().apply(head, tokens, positions, cache)
    logits, cache = self.apply(params, tokens, positions, cache)
    return logits, acceptance[..., 0], cache


HEAD_TOY = HeadTrigramLM(vocab_size=VOCAB, max_len=16)
HEAD_DRAFT = (DRAFT, 1.5 * jax.random.normal(jax.random.key(3), (VOCAB, VOCAB)))

ORACLE_CONFIGS = {
    "confidence-t1-g3": adaptive.AdaptiveConfig(num_draft_tokens=3, max_new_tokens=ORACLE_STEPS,
                                                rule="confidence", confidence_threshold=0.5),
    "head-t0.7-k3-p0.9-eos-g3": adaptive.AdaptiveConfig(
        num_draft_tokens=3, max_new_tokens=ORACLE_STEPS, rule="head", stop_threshold=0.6,
        eos_id=0, sampling=SamplingParams(temperature=0.7, top_k=3, top_p=0.9)),
}


def _draft(config):
  return (HEAD_TOY, HEAD_DRAFT) if config.rule == "head" else (TOY, DRAFT)


def _oracle(config, seed=0):
  """(p-value per prompt of ORACLE_ROWS samples each against the exact joint, stats)."""
  prompt, lengths = ar.pad_prompts([p for p in ORACLE_PROMPTS for _ in range(ORACLE_ROWS)])
  out = adaptive.sample(TOY, TARGET, *_draft(config), prompt, lengths, jax.random.key(seed),
                        config)
  tokens = np.asarray(out.tokens).reshape(len(ORACLE_PROMPTS), ORACLE_ROWS, ORACLE_STEPS)
  p_values = [p_value(rows, toy.exact_joint(TARGET, prompt_tokens, ORACLE_STEPS,
                                            distribution(config.sampling), config.eos_id,
                                            config.pad_id))[0]
              for prompt_tokens, rows in zip(ORACLE_PROMPTS, tokens)]
  return p_values, {name: float(value) for name, value in out.stats.items()}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["head-t0.7-k3-p0.9-eos-g3"])  # the confidence rule at T = 1:
def test_joint_matches_the_exact_target_joint_whatever_the_rule(name):  # test_long_oracle
  """100k samples per prompt; chi-square over the 625 continuations (pooled below 5 expected);
  a correct sampler gives p > 1e-3 (fixed seed). The rule is active: draft lengths vary."""
  p_values, stats = _oracle(ORACLE_CONFIGS[name])
  assert min(p_values) > SIGNIFICANCE
  assert 1.2 < stats["mean_draft_length"] < 2.8, stats


@pytest.mark.slow
def test_a_verifier_that_resamples_from_p_after_a_rejection_fails_the_oracle(fresh_trace):
  """Power: drawing from p instead of norm(max(0, p - q)) after a rejection is caught."""
  fresh_trace.setattr(verify, "residual", lambda p, q: p)
  assert max(_oracle(ORACLE_CONFIGS["confidence-t1-g3"])[0]) < POWER


def test_a_rule_that_never_stops_is_speculative_sampling_token_for_token():
  """confidence_threshold 0 drafts gamma tokens every round, with the same randomness."""
  prompt, lengths = ar.pad_prompts([[1, 2], [3], [0, 1, 2], [2, 2]] * 4)
  config = adaptive.AdaptiveConfig(num_draft_tokens=3, max_new_tokens=6, confidence_threshold=0.0)
  fixed = speculative.SpeculativeConfig(num_draft_tokens=3, max_new_tokens=6)
  out = adaptive.sample(TOY, TARGET, TOY, DRAFT, prompt, lengths, jax.random.key(0), config)
  reference = speculative.sample(TOY, TARGET, TOY, DRAFT, prompt, lengths, jax.random.key(0),
                                 fixed)
  np.testing.assert_array_equal(out.tokens, reference.tokens)
  for name, value in reference.stats.items():
    np.testing.assert_allclose(out.stats[name], value, err_msg=name)
  assert float(out.stats["mean_draft_length"]) == 3 and int(out.stats["draft_calls_saved"]) == 0


def test_rows_follow_their_keys_whatever_the_batch_order_and_under_vmap():
  prompt, lengths = ar.pad_prompts([[1, 2], [3], [0, 1, 2], [2, 2]])
  config = adaptive.AdaptiveConfig(num_draft_tokens=3, max_new_tokens=6, rule="head",
                                   stop_threshold=0.6, eos_id=0)
  run = lambda order, row_keys: adaptive.sample(TOY, TARGET, HEAD_TOY, HEAD_DRAFT, prompt[order],
                                                lengths[order], row_keys, config)
  oracle.assert_rows_follow_their_keys(run)


LLAMA_PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [3, 3, 3, 1], [9], [10, 11, 12], [4, 4],
                 [20, 21, 22, 23, 24, 25], [31]]
LLAMA_STEPS = 16
LLAMA_GAMMA = 4
HEAD_LLAMA = AcceptanceDraftLM(dataclasses.replace(llama_pair.DRAFT.config, draft_heads=DraftHeadsConfig(acceptance=True)))


@pytest.fixture(scope="module")
def pair_params():
  return llama_pair.params()


@pytest.fixture(scope="module")
def greedy_ar(pair_params):
  prompt, lengths = ar.pad_prompts(LLAMA_PROMPTS)
  return ar.sample(llama_pair.TARGET, pair_params[0], prompt, lengths, jax.random.key(0),
                   ar.ARConfig(max_new_tokens=LLAMA_STEPS, sampling=GREEDY))


def _llama(pair_params, config, batch, head=False):
  target, draft = pair_params
  prompt, lengths = ar.pad_prompts(LLAMA_PROMPTS[:batch])
  if head:  # the pair's draft plus a random acceptance head
    draft = {**draft, "acceptance_head": random_params(HEAD_LLAMA)["acceptance_head"]}
  model = HEAD_LLAMA if head else llama_pair.DRAFT
  return adaptive.sample(llama_pair.TARGET, target, model, draft, prompt, lengths,
                         jax.random.key(0), config)


def _check_greedy(pair_params, greedy_ar, out, batch):
  ties = llama_pair.near_ties(pair_params[0], LLAMA_PROMPTS, greedy_ar.tokens[:batch], out.tokens)
  assert ties <= 1, f"{ties} near-ties"
  np.testing.assert_array_equal(out.lengths, [LLAMA_STEPS] * batch)
  stats = {name: float(value) for name, value in out.stats.items()}
  assert 1 < stats["mean_draft_length"] < LLAMA_GAMMA, stats  # ragged draft lengths
  assert 0 < stats["acceptance"] < 1 and stats["rejections"] > 0, stats
  return stats


def test_greedy_head_rule_equals_greedy_ar_token_for_token(pair_params, greedy_ar):
  """Batch 8 with ragged draft lengths; mismatches only from a near-tie (at most one)."""
  config = adaptive.AdaptiveConfig(num_draft_tokens=LLAMA_GAMMA, max_new_tokens=LLAMA_STEPS,
                                   rule="head", stop_threshold=0.7, sampling=GREEDY)
  _check_greedy(pair_params, greedy_ar, _llama(pair_params, config, 8, head=True), 8)


def test_the_confidence_rule_saves_draft_calls_at_identical_greedy_output(pair_params, greedy_ar):
  """Batch 3: the same tokens as greedy AR (and so as fixed-length speculative decoding), with
  fewer draft calls than drafting gamma every round."""
  config = adaptive.AdaptiveConfig(num_draft_tokens=LLAMA_GAMMA, max_new_tokens=LLAMA_STEPS,
                                   confidence_threshold=0.6, sampling=GREEDY)
  stats = _check_greedy(pair_params, greedy_ar, _llama(pair_params, config, 3), 3)
  rounds = stats["target_calls"] - 1
  assert stats["draft_calls_saved"] > 0
  assert stats["draft_calls"] == 1 + LLAMA_GAMMA * rounds - stats["draft_calls_saved"]


def test_bad_input_is_a_clear_error():
  prompt, lengths = ar.pad_prompts([[1, 2]])
  with pytest.raises(ValueError, match="adaptive rule 'head' needs a draft with an acceptance "
                                       "head .* use rule 'confidence'"):
    adaptive.sample(TOY, TARGET, TOY, DRAFT, prompt, lengths, jax.random.key(0),
                    adaptive.AdaptiveConfig(num_draft_tokens=2, max_new_tokens=4, rule="head"))
  with pytest.raises(ValueError, match="draft's vocab_size 6 differs"):
    other = toy.TrigramLM(vocab_size=6, max_len=16)
    adaptive.sample(TOY, TARGET, other, other.init(jax.random.key(0)), prompt, lengths,
                    jax.random.key(0), adaptive.AdaptiveConfig(num_draft_tokens=2,
                                                               max_new_tokens=4))
  for field, value in (("confidence_threshold", -0.1), ("stop_threshold", 1.5)):
    with pytest.raises(ValueError, match=rf"{field} must be in \[0, 1\], got {value}"):
      adaptive.AdaptiveConfig(num_draft_tokens=2, max_new_tokens=4, **{field: value})
  with pytest.raises(ValueError, match="adaptive rule 'length' is unknown; valid rules: "
                                       "confidence, head"):
    adaptive.AdaptiveConfig(num_draft_tokens=2, max_new_tokens=4, rule="length")
  with pytest.raises(ValueError, match=r"num_draft_tokens \(the most drafted per round\) must be "
                                       r">= 1, got 0"):
    adaptive.AdaptiveConfig(num_draft_tokens=0, max_new_tokens=4)

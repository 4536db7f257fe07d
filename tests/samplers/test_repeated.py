"""Repeated sampling: n vmapped samples equal n separate runs with the same per-sample keys (causal
and canvas samplers), the prefill runs once, model calls skipped by `lax.cond` count as run under
vmap, the samples are i.i.d. (200k-sample oracle, a key-reusing variant caught), and
reward-pruned / first-finish decoding keep exactly the samples of plain repeated sampling."""

import dataclasses

import jax
import numpy as np
import pytest

from samplers import ar, entropy_switch, mdlm, pruned, repeated, selection, speculative, unmask
from samplers.core.logits import SamplingParams
from tests.samplers import oracle, toy
from tests.samplers import toy_denoiser as td

PREFILLS = []


@dataclasses.dataclass(frozen=True)
class CountingPrefill(toy.TrigramLM):
  """The trigram model with a `prefill` that records each execution (one per call, not per
  vmapped sample, when its inputs are not batched)."""

  def prefill(self, params, tokens, positions, cache):
    jax.debug.callback(lambda t: PREFILLS.append(t.shape), tokens)
    return self.apply(params, tokens, positions, cache)


TOY = CountingPrefill(vocab_size=5, max_len=24)
DRAFT = toy.TrigramLM(vocab_size=5, max_len=24)
PROMPTS = ar.pad_prompts([[1, 2], [3], [0, 4, 2]])
EOS = 4


@pytest.fixture(scope="module")
def params():
  return TOY.init(jax.random.key(1)), DRAFT.init(jax.random.key(2))


def test_n_at_once_equals_one_at_a_time_and_prefills_once(params):
  config = ar.ARConfig(max_new_tokens=6, eos_id=EOS)
  PREFILLS.clear()
  out = repeated.sample(ar.sample, (TOY,), (params[0],), *PROMPTS, jax.random.key(0), config, 5)
  jax.block_until_ready(out)
  assert PREFILLS == [(3, 3)]  # one prefill of the 3 prompts for all 5 samples
  assert out.tokens.shape == (3, 5, 6) and out.lengths.shape == (3, 5)
  keys = repeated.sample_keys(jax.random.key(0), 5)
  calls = []
  for i in range(5):
    alone = ar.sample(TOY, params[0], *PROMPTS, keys[i], config)
    np.testing.assert_array_equal(out.tokens[:, i], alone.tokens)
    np.testing.assert_array_equal(out.lengths[:, i], alone.lengths)
    calls.append(int(alone.stats["model_calls"]))
  assert int(out.stats["sample_model_calls"]) == sum(calls)
  assert int(out.stats["model_calls"]) == max(calls)  # the prefill counted once
  assert int(out.stats["generated_tokens"]) == int(np.sum(out.lengths))
  assert len({tuple(np.asarray(out.tokens[0, i])) for i in range(5)}) > 1


DENOISER = td.TabularDenoiser(vocab=3, length=4)
CANVAS = np.array([[0, 3, 3, 3], [3, 3, 3, 3], [3, 2, 3, 1]], np.int32)  # 3 is the mask id
T1 = SamplingParams(temperature=1.0)


@pytest.mark.parametrize("sample_fn,config", [
    (unmask.sample, unmask.UnmaskConfig(rule="threshold", threshold=0.6, sampling=T1)),
    (unmask.sample, unmask.UnmaskConfig(rule="threshold", threshold=0.6, sampling=T1, slots=2)),
    (mdlm.sample, mdlm.AncestralConfig(steps=4, sampling=T1)),
], ids=["unmask", "unmask-slots2", "mdlm"])
def test_canvas_samplers_n_at_once_equal_one_at_a_time(sample_fn, config):
  """The canvas signature (models, canvas, key, config): sample i of every row is the lone run
  with key fold_in(key, i), tokens and lengths."""
  params = DENOISER.params(td.random_joint(0, 3, 4))
  n = 5
  out = repeated.sample(sample_fn, (DENOISER,), (params,), CANVAS, jax.random.key(0), config, n)
  assert out.tokens.shape == (3, n, 4) and out.lengths.shape == (3, n)
  keys = repeated.sample_keys(jax.random.key(0), n)
  for i in range(n):
    alone = sample_fn(DENOISER, params, CANVAS, keys[i], config)
    np.testing.assert_array_equal(out.tokens[:, i], alone.tokens)
    np.testing.assert_array_equal(out.lengths[:, i], alone.lengths)
  assert len({tuple(np.asarray(out.tokens[1, i])) for i in range(n)}) > 1
  assert int(out.stats["generated_tokens"]) == n * int(np.sum(CANVAS == 3))


def test_unmask_calls_are_each_samples_own_under_repeated():
  """unmask skips no call with lax.cond: each sample's model_calls is its lone run's, and the
  vmapped while loop runs as many passes as the slowest sample."""
  params = DENOISER.params(td.random_joint(0, 3, 4))
  config = unmask.UnmaskConfig(rule="threshold", threshold=0.6, sampling=T1)
  out = repeated.sample(unmask.sample, (DENOISER,), (params,), CANVAS, jax.random.key(0), config, 8)
  keys = repeated.sample_keys(jax.random.key(0), 8)
  alone = [int(unmask.sample(DENOISER, params, CANVAS, k, config).stats["model_calls"])
           for k in keys]
  np.testing.assert_array_equal(out.sample_stats["model_calls"], alone)
  assert int(out.stats["model_calls"]) == max(alone)
  assert int(out.stats["sample_model_calls"]) == sum(alone)


def _has_cond(fn, *args) -> bool:
  return "cond[" in str(jax.make_jaxpr(fn)(*args))


def test_mdlm_under_vmap_reports_the_denoiser_calls_that_ran():
  """mdlm reuses the denoiser's output after a step that unmasked nothing (a lax.cond); under
  repeated's vmap each sample decides alone, the cond is a select (no cond left in the program)
  that calls the denoiser at every step, and every sample's model_calls says so: S each. Lone
  runs with the same keys do save calls (the test has power)."""
  params = DENOISER.params(td.random_joint(0, 3, 4))
  steps, n = 4, 12
  config = mdlm.AncestralConfig(steps=steps, sampling=T1)
  canvas = np.full((1, 4), 3, np.int32)
  run = lambda key: repeated.sample(mdlm.sample, (DENOISER,), (params,), canvas, key, config, n)
  alone = lambda key: mdlm.sample(DENOISER, params, canvas, key, config)
  assert _has_cond(alone, jax.random.key(0)) and not _has_cond(run, jax.random.key(0))
  out = run(jax.random.key(0))
  lone_calls = [int(alone(k).stats["model_calls"]) for k in repeated.sample_keys(
      jax.random.key(0), n)]
  assert min(lone_calls) < steps, lone_calls  # lone runs skip calls
  np.testing.assert_array_equal(out.sample_stats["model_calls"], [steps] * n)
  assert int(out.stats["model_calls"]) == steps
  assert int(out.stats["sample_model_calls"]) == n * steps
  np.testing.assert_allclose(out.sample_stats["tokens_per_call"], 4 / steps)


def test_entropy_switch_under_vmap_reports_the_large_calls_that_ran(params):
  """The large model is called under a lax.cond only when some row needs it; under repeated's
  vmap that cond is a select running it at every step, so each sample's large_calls (=
  model_calls) is 1 + its steps (= small_calls), and the program's the longest sample's. A lone
  run with the same key saves large calls (the test has power)."""
  small, large = params[0], DRAFT.init(jax.random.key(9))
  config = entropy_switch.EntropySwitchConfig(max_new_tokens=8, threshold=1.4, window=2,
                                              sync_every=4, eos_id=EOS)
  models = (DRAFT, toy.TrigramLM(5, 24))
  out = repeated.sample(entropy_switch.sample, models, (small, large), *PROMPTS,
                        jax.random.key(2), config, 4)
  keys = repeated.sample_keys(jax.random.key(2), 4)
  lone = [entropy_switch.sample(DRAFT, small, models[1], large, *PROMPTS, k, config) for k in keys]
  assert any(int(o.stats["large_calls"]) < int(o.stats["small_calls"]) for o in lone)
  for i, o in enumerate(lone):
    np.testing.assert_array_equal(out.tokens[:, i], o.tokens)
    assert int(out.sample_stats["small_calls"][i]) == int(o.stats["small_calls"])
  np.testing.assert_array_equal(out.sample_stats["large_calls"], out.sample_stats["small_calls"])
  np.testing.assert_array_equal(out.sample_stats["model_calls"], out.sample_stats["small_calls"])
  assert int(out.stats["model_calls"]) == int(np.max(out.sample_stats["small_calls"]))


@pytest.mark.slow
def test_composes_with_speculative_sampling(params):
  config = speculative.SpeculativeConfig(num_draft_tokens=2, max_new_tokens=5, eos_id=EOS)
  models = (toy.TrigramLM(5, 24), DRAFT)
  out = repeated.sample(speculative.sample, models, params, *PROMPTS, jax.random.key(7), config, 2)
  keys = repeated.sample_keys(jax.random.key(7), 2)
  for i in range(2):
    alone = speculative.sample(models[0], params[0], DRAFT, params[1], *PROMPTS, keys[i], config)
    np.testing.assert_array_equal(out.tokens[:, i], alone.tokens)
  assert out.sample_stats["acceptance"].shape == (2,)


def test_bad_input():
  with pytest.raises(ValueError, match="num_samples"):
    repeated.sample_keys(jax.random.key(0), 0)
  with pytest.raises(ValueError, match="one key"):
    repeated.sample_keys(jax.random.split(jax.random.key(0), 2), 3)
  with pytest.raises(ValueError, match="same leading batch axis"):
    repeated.sample(ar.sample, (DRAFT,), (None,), PROMPTS[0], PROMPTS[1][:2], jax.random.key(0),
                    ar.ARConfig(max_new_tokens=2), 2)
  with pytest.raises(ValueError, match="at least one data array"):
    repeated.sample(mdlm.sample, (DENOISER,), (None,), jax.random.key(0),
                    mdlm.AncestralConfig(steps=2), 2)
  with pytest.raises(ValueError, match="keep_fraction"):
    pruned.PrunedConfig(num_samples=4, max_new_tokens=3, keep_fraction=0.0)
  with pytest.raises(ValueError, match="num_samples"):
    pruned.PrunedConfig(num_samples=0, max_new_tokens=3)


@pytest.mark.slow
def test_reward_pruned_keeps_plain_samples_and_saves_compute(params):
  """Survivors are exactly samples of plain repeated AR with the same key; keep_fraction=1 is
  plain best-of-n; pruning draws fewer tokens."""
  n, steps = 4, 8
  prompt, lengths = PROMPTS
  plain = repeated.sample(ar.sample, (TOY,), (params[0],), prompt, lengths, jax.random.key(3),
                          ar.ARConfig(max_new_tokens=steps, eos_id=EOS), n)
  scorer = selection.log_likelihood(TOY, params[0], prompt, lengths)
  best = selection.best_of_n(selection.score(scorer, plain.tokens, plain.lengths))
  full = pruned.reward_pruned(TOY, params[0], prompt, lengths, jax.random.key(3), pruned.PrunedConfig(
      num_samples=n, max_new_tokens=steps, score_every=3, keep_fraction=1.0, eos_id=EOS), scorer)
  np.testing.assert_array_equal(full.sample_index, best)
  np.testing.assert_array_equal(full.tokens, np.asarray(plain.tokens)[np.arange(3), best])
  assert full.stats["generated_tokens"] == int(plain.stats["generated_tokens"])
  cut = pruned.reward_pruned(TOY, params[0], prompt, lengths, jax.random.key(3), pruned.PrunedConfig(
      num_samples=n, max_new_tokens=steps, score_every=2, keep_fraction=0.25, min_keep=2,
      eos_id=EOS), scorer)
  assert cut.stats["surviving_samples"] == 3 * 2
  tokens = np.asarray(plain.tokens)
  for b in range(3):
    np.testing.assert_array_equal(cut.tokens[b], tokens[b, cut.sample_index[b]])
  assert cut.stats["generated_tokens"] < full.stats["generated_tokens"]
  assert cut.stats["row_steps"] < full.stats["row_steps"]
  with pytest.raises(ValueError, match="shape"):
    pruned.reward_pruned(TOY, params[0], prompt, lengths, jax.random.key(3), pruned.PrunedConfig(
        num_samples=n, max_new_tokens=steps, score_every=2, keep_fraction=0.25, min_keep=2,
        eos_id=EOS), lambda tokens, lengths: np.zeros(tokens.shape[0]))


def test_first_finish_stops_at_the_first_eos(params):
  n, steps = 4, 8
  prompt, lengths = PROMPTS
  plain = repeated.sample(ar.sample, (TOY,), (params[0],), prompt, lengths, jax.random.key(5),
                          ar.ARConfig(max_new_tokens=steps, eos_id=EOS), n)
  out = pruned.first_finish(TOY, params[0], prompt, lengths, jax.random.key(5),
                            pruned.PrunedConfig(num_samples=n, max_new_tokens=steps, eos_id=EOS))
  expected = selection.first_finish(plain.tokens, plain.lengths, EOS)
  np.testing.assert_array_equal(out.sample_index, expected)
  np.testing.assert_array_equal(out.tokens, np.asarray(plain.tokens)[np.arange(3), expected])
  lengths_ = np.asarray(plain.lengths)
  first_eos = max(lengths_[b, expected[b]] for b in range(3))
  assert out.stats["model_calls"] == 1 + first_eos <= int(plain.stats["model_calls"]) + 1


@pytest.mark.slow
def test_vmapped_samples_are_iid():
  """200k samples (100k pairs): each sample follows the exact joint, and consecutive samples
  (2j, 2j+1) follow the product of joints. Reusing each key for two samples passes the marginal
  test but fails the pair test."""
  model = toy.TrigramLM(vocab_size=3, max_len=8)
  table = model.init(jax.random.key(11))
  steps, n = 2, 200_000
  joint = toy.exact_joint(table, [1], steps)
  prompt, lengths = ar.pad_prompts([[1]])
  config = ar.ARConfig(max_new_tokens=steps)

  def pair_p(tokens):
    pairs = np.asarray(tokens).reshape(n // 2, 2 * steps)
    return oracle.p_value(pairs, np.multiply.outer(joint, joint))[0]

  out = repeated.sample(ar.sample, (model,), (table,), prompt, lengths, jax.random.key(0), config, n)
  tokens = np.asarray(out.tokens[0])
  assert oracle.p_value(tokens, joint)[0] > oracle.SIGNIFICANCE
  assert pair_p(tokens) > oracle.SIGNIFICANCE

  reused = jax.vmap(lambda k: ar.sample(model, table, prompt, lengths, k, config))(
      repeated.sample_keys(jax.random.key(0), n // 2)[np.arange(n) // 2]).tokens[:, 0]
  assert oracle.p_value(reused, joint)[0] > oracle.SIGNIFICANCE
  assert pair_p(reused) < oracle.POWER

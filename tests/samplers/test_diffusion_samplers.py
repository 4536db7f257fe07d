"""Diffusion-style samplers against tabular perfect models whose exact joint is enumerable.

Statistical tests draw 100k vmapped samples of a length-4 canvas over 3 tokens (81 cells) and
compare them with the exact output distribution by Pearson chi-square with pooled cells
(`oracle.p_value`): a correct sampler must give p > SIGNIFICANCE (1e-3), a biased or broken one
p < POWER (1e-9).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from samplers import assd, block_diffusion, edlm, mdlm, unmask
from samplers.core import canvas as canvas_lib
from samplers.core import verify
from samplers.core.logits import SamplingParams
from tests.samplers import toy
from tests.samplers import toy_denoiser as td
from tests.samplers.oracle import POWER, SIGNIFICANCE, draw, p_value

VOCAB, LENGTH = 3, 4
JOINT = td.random_joint(0, VOCAB, LENGTH)
MASKS = jnp.full((1, LENGTH), VOCAB, jnp.int32)
T1 = SamplingParams(temperature=1.0)


def unmask_row(config, model=td.TabularDenoiser(VOCAB, LENGTH), joint=JOINT):
  params = model.params(joint)
  return lambda key: unmask.sample(model, params, MASKS, key, config)


@pytest.mark.slow
@pytest.mark.parametrize("order", ["left_to_right", "random", "max_prob"])
def test_one_token_per_step_reproduces_the_joint(order):
  """A position chosen without looking at its sampled token (fixed, random, or by the
  distribution's confidence) and sampled from its conditional: the joint exactly."""
  tokens, stats = draw(unmask_row(unmask.UnmaskConfig(k=1, confidence=order, sampling=T1)))
  assert p_value(tokens, JOINT)[0] > SIGNIFICANCE
  assert np.all(stats["model_calls"] == LENGTH)
  assert np.all(tokens < VOCAB)


@pytest.mark.slow
def test_confidence_of_the_sampled_token_is_biased():
  """LLaDA's low-confidence remasking looks at the sampled token: measurably not the joint."""
  tokens, _ = draw(unmask_row(unmask.UnmaskConfig(k=1, confidence="sampled", sampling=T1)))
  distance = td.tv(td.empirical(tokens, VOCAB, LENGTH), JOINT)
  print(f"sampled-token confidence: TV to the joint {distance:.3f}")
  assert p_value(tokens, JOINT)[0] < POWER
  assert distance > 0.05


@pytest.mark.slow
def test_two_tokens_per_step_give_the_product_of_conditionals():
  tokens, stats = draw(unmask_row(unmask.UnmaskConfig(k=2, confidence="left_to_right",
                                                      sampling=T1)))
  product = td.grouped_joint(JOINT, [[0, 1], [2, 3]])
  print(f"k=2: TV(product of conditionals, joint) = {td.tv(product, JOINT):.3f}")
  assert p_value(tokens, product)[0] > SIGNIFICANCE
  assert p_value(tokens, JOINT)[0] < POWER
  assert np.all(stats["model_calls"] == 2)


@pytest.mark.slow
@pytest.mark.parametrize("schedule,steps", [("loglinear", 2), ("cosine", 3)])
def test_ancestral_sampler_matches_its_exact_transition(schedule, steps):
  model = td.TabularDenoiser(VOCAB, LENGTH)
  params, config = model.params(JOINT), mdlm.AncestralConfig(steps, schedule, T1)
  tokens, stats = draw(lambda key: mdlm.sample(model, params, MASKS, key, config))
  probs = [float(mdlm.unmask_probability(schedule, jnp.int32(k), steps)) for k in range(steps)]
  exact = td.ancestral_joint(JOINT, probs)
  assert p_value(tokens, exact)[0] > SIGNIFICANCE
  assert p_value(tokens, JOINT)[0] < POWER  # parallel steps are not the joint
  # a step that unmasked nothing is followed by a reused denoiser output, not a call
  assert np.all(stats["model_calls"] == steps)  # vmapped: the cond is a select, every step calls


def test_greedy_safe_threshold_equals_sequential_greedy():
  """Enumeration over 1000 random joints: committing every max-prob >= 1 - 1/(N + 1) gives the
  sequential greedy result; a looser fixed threshold (0.5) does not (the check has power)."""
  model = td.TabularDenoiser(VOCAB, LENGTH)
  joints = jnp.asarray(np.stack([td.random_joint(s, VOCAB, LENGTH, 2.5).ravel()
                                 for s in range(1000)]), jnp.float32)

  def run(config):
    one = lambda joint: unmask.sample(model, {"joint": joint}, MASKS, jax.random.key(0), config)
    out = jax.jit(jax.vmap(one))(joints)
    return np.asarray(out.tokens[:, 0]), np.asarray(out.stats["model_calls"])

  sequential, _ = run(unmask.UnmaskConfig(k=1))
  safe, calls = run(unmask.UnmaskConfig(rule="greedy_safe"))
  loose, _ = run(unmask.UnmaskConfig(rule="threshold", threshold=0.5))
  np.testing.assert_array_equal(safe, sequential)
  assert np.mean(calls) < LENGTH  # it does decode in parallel
  assert np.any(np.any(loose != sequential, axis=1))


@pytest.mark.parametrize("rule", ["threshold", "factor"])
def test_threshold_rules_commit_at_least_one_token_per_call(rule):
  config = unmask.UnmaskConfig(rule=rule, threshold=0.99, factor=0.01, sampling=T1)
  out = jax.vmap(unmask_row(config))(jax.random.split(jax.random.key(1), 64))
  assert np.all(np.asarray(out.stats["model_calls"]) <= LENGTH)
  assert np.all(np.asarray(out.tokens) < VOCAB)


class MaskLovingDenoiser:
  """Breaks the protocol on purpose: favours the mask id and rewrites visible tokens."""

  vocab_size, max_len, mask_id, block_size = 4, 6, 3, 0

  def denoise(self, params, tokens):
    logits = jax.random.normal(jax.random.key(0), tokens.shape + (4,))
    return logits.at[..., 3].set(10.0)


@pytest.mark.parametrize("sampler", ["unmask", "ancestral", "block"])
def test_committed_tokens_never_change_and_no_mask_remains(sampler):
  model = MaskLovingDenoiser()
  canvas = jnp.array([[0, 3, 3, 1, 3, 2], [3, 3, 3, 3, 3, 3]], jnp.int32)
  config = {"unmask": unmask.UnmaskConfig(k=2, sampling=T1),
            "ancestral": mdlm.AncestralConfig(3, sampling=T1),
            "block": block_diffusion.BlockConfig(3, cache="none")}[sampler]
  fn = {"unmask": unmask.sample, "ancestral": mdlm.sample, "block": block_diffusion.sample}
  out = fn[sampler](model, None, canvas, jax.random.key(2), config)
  tokens = np.asarray(out.tokens)
  visible = np.asarray(canvas) != 3
  np.testing.assert_array_equal(tokens[visible], np.asarray(canvas)[visible])
  assert np.all(tokens != 3)
  np.testing.assert_array_equal(out.lengths, [3, 6])


def test_rows_follow_their_keys():
  """Same per-row keys, reversed batch: reversed rows; vmap over key sets equals separate runs."""
  model = td.TabularDenoiser(VOCAB, LENGTH)
  params = model.params(JOINT)
  canvas = jnp.array([[0, 3, 3, 3], [3, 1, 3, 3], [3, 3, 3, 3], [2, 2, 3, 3]], jnp.int32)
  config = unmask.UnmaskConfig(rule="threshold", threshold=0.6, sampling=T1)
  keys = jax.random.split(jax.random.key(4), 4)
  forward = unmask.sample(model, params, canvas, keys, config)
  backward = unmask.sample(model, params, canvas[::-1], keys[::-1], config)
  np.testing.assert_array_equal(forward.tokens, backward.tokens[::-1])
  many = jax.vmap(lambda k: unmask.sample(model, params, canvas, k, config))(
      jnp.stack([keys, jax.random.split(jax.random.key(5), 4)]))
  np.testing.assert_array_equal(many.tokens[0], forward.tokens)
  # row_model_calls: what decoding each row alone (batch 1) costs
  alone = [unmask.sample(model, params, canvas[i:i + 1], keys[i:i + 1], config) for i in range(4)]
  assert int(forward.stats["row_model_calls"]) == sum(int(a.stats["model_calls"]) for a in alone)
  assert int(forward.stats["row_model_calls"]) < 4 * int(forward.stats["model_calls"])


@pytest.mark.parametrize("slots", [1, 3, 5])
def test_continuous_batching_gives_each_row_its_tokens_in_its_own_calls(slots):
  """slots < B (`samplers.core.refill`): every row's tokens and calls equal the one-batch run's, and
  the passes lie between the rows' own calls spread over the slots and one pass per row call."""
  model = td.TabularDenoiser(VOCAB, LENGTH)
  params = model.params(JOINT)
  rows = jnp.array([[3, 3, 3, 3], [0, 3, 3, 3], [1, 2, 0, 1], [3, 1, 3, 3], [3, 3, 3, 3],
                    [2, 2, 3, 3], [3, 3, 3, 3]], jnp.int32)
  config = unmask.UnmaskConfig(rule="threshold", threshold=0.6, sampling=T1)
  keys = jax.random.split(jax.random.key(6), len(rows))
  together = unmask.sample(model, params, rows, keys, config)
  streamed = unmask.sample(model, params, rows, keys, dataclasses.replace(config, slots=slots))
  np.testing.assert_array_equal(streamed.tokens, together.tokens)
  row_calls = int(together.stats["row_model_calls"])
  assert int(streamed.stats["row_model_calls"]) == row_calls
  passes = int(streamed.stats["model_calls"])
  assert int(streamed.stats["rows_per_call"]) == min(slots, len(rows))
  # one row per call: exactly the rows' own calls, plus one for the refilled row without masks
  assert passes == row_calls + 1 if slots == 1 else row_calls / slots <= passes < row_calls
  generated = int(streamed.stats["generated_tokens"])
  assert float(streamed.stats["tokens_per_call"]) == pytest.approx(
      generated / (min(slots, len(rows)) * passes))


def test_block_causal_cache_equals_cache_free():
  model = td.TabularDenoiser(VOCAB, LENGTH, block_size=2)
  params = model.params(JOINT)
  canvas = jnp.array([[1, 3, 3, 3], [3, 3, 3, 3]], jnp.int32)
  keys = jax.random.split(jax.random.key(3), 256)
  rule = unmask.UnmaskConfig(rule="threshold", threshold=0.5, sampling=T1)
  outs = [jax.vmap(lambda k: block_diffusion.sample(
      model, params, canvas, k, block_diffusion.BlockConfig(2, rule, cache)))(keys)
          for cache in ("exact", "none")]
  np.testing.assert_array_equal(outs[0].tokens, outs[1].tokens)
  steps = np.asarray(outs[1].stats["denoise_steps"])
  np.testing.assert_array_equal(outs[1].stats["model_calls"], steps)
  np.testing.assert_array_equal(outs[0].stats["model_calls"], steps + 1)  # one block write


BLOCK_JOINT = td.random_joint(1, 2, 8)  # 2 tokens over 8 positions: 4 blocks of 2


@pytest.mark.parametrize("block_size,cache", [(2, "exact"), (2, "none"), (0, "none")])
def test_a_block_decoded_row_does_not_depend_on_its_batch(block_size, cache):
  """Rows with prompts of different lengths finish their blocks after different numbers of steps;
  each row's draws follow its own steps, so a row decoded alone, in the batch and vmapped gets the
  same tokens (sampled, several seeds)."""
  model = td.TabularDenoiser(2, 8, block_size=block_size)
  params, m = model.params(BLOCK_JOINT), model.mask_id
  canvas = jnp.array([[0] + [m] * 7, [1, 0, 1] + [m] * 5, [m] * 8, [1, 1, 0, 1, 0, m, m, m]],
                     jnp.int32)
  rule = unmask.UnmaskConfig(rule="threshold", threshold=0.7, sampling=T1)
  config = block_diffusion.BlockConfig(2, rule, cache)
  run = lambda c, k: block_diffusion.sample(model, params, c, k, config).tokens
  for seed in range(6):
    keys = jax.random.split(jax.random.key(seed), len(canvas))
    batched = np.asarray(run(canvas, keys))
    assert np.all(batched != m)
    vmapped = jax.vmap(lambda c, k: run(c[None], k[None])[0])(canvas, keys)
    np.testing.assert_array_equal(vmapped, batched)
    for i in range(len(canvas)):
      np.testing.assert_array_equal(run(canvas[i:i + 1], keys[i:i + 1])[0], batched[i])


def test_each_cache_is_refused_on_the_models_it_does_not_suit():
  """The exact cache needs a block-causal model of the same blocks (a bidirectional one and one
  of other blocks are refused with the fixes named); Fast-dLLM's caches need a bidirectional
  one; an unknown cache names the valid ones."""
  rule = unmask.UnmaskConfig(k=1, sampling=T1)
  for model in (td.TabularDenoiser(VOCAB, LENGTH), td.TabularDenoiser(VOCAB, LENGTH, 4)):
    params = model.params(JOINT)
    with pytest.raises(ValueError, match=(
        r"exact block cache needs .*block_size equal to sampler.block_length \(2\).*"
        r"cache='none' \(`--set sampler.cache=none`\).*cache='prefix' or 'dual'")):
      block_diffusion.sample(model, params, MASKS, jax.random.key(0),
                             block_diffusion.BlockConfig(2, rule))
  block_causal = td.TabularDenoiser(VOCAB, LENGTH, 2)
  for cache in ("prefix", "dual"):
    with pytest.raises(ValueError, match=rf"cache='{cache}' \(Fast-dLLM\) is for a bidirectional "
                                         r"denoiser; .*use cache='exact' with blocks of 2"):
      block_diffusion.sample(block_causal, block_causal.params(JOINT), MASKS, jax.random.key(0),
                             block_diffusion.BlockConfig(2, rule, cache))
  with pytest.raises(ValueError, match="cache 'stale' is unknown; valid: none, exact, prefix"):
    block_diffusion.BlockConfig(2, rule, "stale")


@pytest.mark.slow
def test_assd_follows_the_joint_and_a_missing_residual_is_caught(fresh_trace):
  """Left to right without reused drafts and random order with them, 100k samples each (81
  cells); random order without reuse is checked over 8 positions in test_long_oracle."""
  model = td.TabularAnySubset(VOCAB, LENGTH)
  params = model.params(JOINT)
  for order, reuse in (("left_to_right", False), ("random", True)):
    config = assd.ASSDConfig(num_draft_tokens=3, order=order, sampling=T1, reuse_drafts=reuse)
    tokens, stats = draw(lambda key: assd.sample(model, params, MASKS, key, config), 100_000)
    assert p_value(tokens, JOINT)[0] > SIGNIFICANCE
    assert np.all(stats["model_calls"] <= LENGTH + reuse)  # reuse: one call to start
    assert np.mean(stats["model_calls"]) < LENGTH  # more than one token per call on average
  fresh_trace.setattr(verify, "residual", lambda p, q: p)  # resample from p after a rejection
  jax.clear_caches()  # the sampler was traced above with the same static config
  for reuse in (False, True):
    config = assd.ASSDConfig(num_draft_tokens=3, sampling=T1, reuse_drafts=reuse)
    tokens, _ = draw(lambda key: assd.sample(model, params, MASKS, key, config), 100_000)
    assert p_value(tokens, JOINT)[0] < POWER


def test_greedy_assd_equals_greedy_left_to_right():
  model = td.TabularAnySubset(VOCAB, LENGTH)
  joints = [td.random_joint(s, VOCAB, LENGTH, 2.5) for s in range(20)]
  for joint in joints:
    fixed = {}
    for i in range(LENGTH):
      fixed[i] = int(np.argmax(td.conditional(joint, fixed, i)))
    for reuse in (False, True):
      out = assd.sample(model, model.params(joint), MASKS, jax.random.key(0),
                        assd.ASSDConfig(3, sampling=SamplingParams(0.0), reuse_drafts=reuse))
      np.testing.assert_array_equal(out.tokens[0], [fixed[i] for i in range(LENGTH)])


@dataclasses.dataclass(frozen=True)
class PositionalDenoiser:
  """A denoiser whose prediction at a position depends on the position only, never on the other
  tokens (padding included): a row's result can then depend on its batch only through the
  sampler. Params: logits [max_len, vocab_size]."""

  vocab_size: int
  max_len: int
  mask_id: int
  block_size: int = 0

  def denoise(self, params, tokens):
    return jnp.broadcast_to(params[:tokens.shape[1]], tokens.shape + (self.vocab_size,))


def test_an_edlm_row_does_not_depend_on_the_padding_of_its_batch():
  """A short prompt batched with a longer one is followed by padding; its energy scores only the
  row's own tokens, and its draws are per position, so it gets the tokens it gets alone."""
  vocab, mask, pad, new = 5, 4, 3, 4  # pad is a real token: the AR model has an opinion of it
  ar_model = toy.TrigramLM(vocab, 16)
  table = np.array(ar_model.init(jax.random.key(8), 2.0))
  table[..., mask] = -1e9
  table = jnp.asarray(table)
  model = PositionalDenoiser(vocab, 16, mask)
  params = jax.random.normal(jax.random.key(9), (16, vocab))
  prompts = jnp.array([[0, 1, 0, 0, 0, 0, 0, 0], [0, 2, 1, 3, 2, 0, 1, 2]], jnp.int32)
  lengths = jnp.array([2, 8])
  batch = canvas_lib.from_prompts(prompts, lengths, new, mask, pad)  # [2, 12]: row 0 padded
  alone = canvas_lib.from_prompts(prompts[:1, :2], lengths[:1], new, mask, pad)  # [1, 6]
  # scoring the padding too changes row 0 in 7 of these 12 seeds
  config = edlm.EDLMConfig(steps=2, num_candidates=8, sampling=T1, pad_id=pad)
  for seed in range(12):
    keys = jax.random.split(jax.random.key(seed), 2)
    together = edlm.sample(model, params, ar_model, table, batch, keys, config)
    single = edlm.sample(model, params, ar_model, table, alone, keys[:1], config)
    np.testing.assert_array_equal(canvas_lib.generated(single.tokens, lengths[:1], new)[0],
                                  canvas_lib.generated(together.tokens, lengths, new)[0])


def test_bad_input_is_a_clear_error():
  model = td.TabularDenoiser(VOCAB, LENGTH)
  params = model.params(JOINT)
  with pytest.raises(ValueError, match="not divisible by block_length"):
    block_diffusion.sample(model, params, MASKS, jax.random.key(0),
                           block_diffusion.BlockConfig(3, cache="none"))
  with pytest.raises(ValueError, match="steps must be >= 1"):
    mdlm.AncestralConfig(0)
  with pytest.raises(ValueError, match="exceeds the 4 canvas positions"):
    mdlm.sample(model, params, MASKS, jax.random.key(0), mdlm.AncestralConfig(5))
  with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\]"):
    unmask.UnmaskConfig(rule="threshold", threshold=1.5)
  with pytest.raises(ValueError, match="greedy_safe' needs confidence 'max_prob'"):
    unmask.UnmaskConfig(rule="greedy_safe", confidence="margin")
  with pytest.raises(ValueError, match=r"slots \(rows per model call\) must be >= 1 or None"):
    unmask.UnmaskConfig(slots=0)
  with pytest.raises(ValueError, match="continuous batching is for unmask.sample"):
    block_diffusion.BlockConfig(4, unmask.UnmaskConfig(slots=2))
  with pytest.raises(ValueError, match="vocabulary"):
    edlm.sample(model, params, toy.TrigramLM(VOCAB, LENGTH), jnp.zeros((3, 3, 3)), MASKS,
                jax.random.key(0), edlm.EDLMConfig(1))
  with pytest.raises(ValueError, match="needs a CachedDenoiser"):
    block_diffusion.sample(MaskLovingDenoiser(), None, jnp.zeros((1, 6), jnp.int32),
                           jax.random.key(0), block_diffusion.BlockConfig(3))

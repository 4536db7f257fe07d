"""Learned parallel unmasking (Learn2PD) with the end-of-text stop.

A tabular perfect denoiser over length-4 sequences of 3 tokens (`toy_denoiser`) gets a finality
table: the finality logit of position i in a row with n masks is table[i, n]. Checked: threshold
1.0 equals `unmask` top-1 token for token (greedy and sampled, 300 joints), the learned rule
equals a numpy re-implementation on enumerated conditionals, progress when nothing is final, one
call when everything is, committed tokens kept and no mask left even with a protocol-breaking
model, the eos stop (pads, fewer calls, nothing before the stop changed), batch and vmap
independence, bad input; and the real `learn2pd` model (random weights) end to end, from Python
and through `generate.decode`.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.config import DiffusionConfig, FinalityConfig, ModelConfig
from models.diffusion import MaskedDiffusionLM
from models.learn2pd import Learn2PD
from paxlike import config as config_lib
from paxlike import generate
from paxlike.config import SamplerConfig
from paxlike.errors import UserError
from samplers.core import canvas as canvas_lib
from samplers import learned_unmask, unmask
from samplers.learned_unmask import LearnedUnmaskConfig
from samplers.core.logits import SamplingParams
from tests.models.random_params import random_params
from tests.samplers import toy_denoiser as td

VOCAB, LENGTH = 3, 4
MASK = VOCAB
MASKS = jnp.full((1, LENGTH), MASK, jnp.int32)
T1 = SamplingParams(temperature=1.0)


@dataclasses.dataclass(frozen=True)
class TabularFinality(td.TabularDenoiser):
  """A perfect denoiser plus a finality table: params["finality"] [T, T + 1] float32, the logit
  at position i when the row has n masks is finality[i, n]."""

  def params(self, joint, table=None) -> dict:
    table = np.zeros((self.length, self.length + 1)) if table is None else table
    return {**super().params(joint), "finality": jnp.asarray(table, jnp.float32)}

  def denoise_with_finality(self, params, tokens):
    masked = jnp.sum(tokens == self.mask_id, axis=1)
    return self.denoise(params, tokens), params["finality"][:, masked].T


MODEL = TabularFinality(VOCAB, LENGTH)


def joints_and_tables(count: int, scale: float) -> tuple[jax.Array, jax.Array]:
  """[count, V^T] joints and [count, T, T + 1] finality tables (normal logits times scale)."""
  joints = np.stack([td.random_joint(s, VOCAB, LENGTH, 2.5).ravel() for s in range(count)])
  tables = scale * np.random.default_rng(count).normal(size=(count, LENGTH, LENGTH + 1))
  return jnp.asarray(joints, jnp.float32), jnp.asarray(tables, jnp.float32)


def run_many(config, joints, tables, canvas=MASKS, sampler=learned_unmask.sample):
  """One row per (joint, table), each with its own key: (tokens [N, T], stats of [N])."""
  def one(joint, table, key):
    return sampler(MODEL, {"joint": joint, "finality": table}, canvas, key, config)
  keys = jax.random.split(jax.random.key(7), len(joints))
  out = jax.jit(jax.vmap(one))(joints, tables, keys)
  return np.asarray(out.tokens[:, 0]), {k: np.asarray(v) for k, v in out.stats.items()}


@pytest.mark.parametrize("sampling", [SamplingParams(temperature=0.0), T1])
def test_threshold_one_equals_unmask_top1(sampling):
  """Saturated finality logits (|f| up to ~100) are ignored at threshold 1.0: one token per
  step, the max-prob top-1 rule, token for token with the same keys."""
  joints, tables = joints_and_tables(300, scale=40.0)
  learned, stats = run_many(LearnedUnmaskConfig(finality_threshold=1.0, sampling=sampling),
                            joints, tables)
  top1, top1_stats = run_many(unmask.UnmaskConfig(k=1, sampling=sampling), joints, tables,
                              sampler=lambda m, p, c, k, cfg: unmask.sample(m, p, c, k, cfg))
  np.testing.assert_array_equal(learned, top1)
  assert np.all(stats["model_calls"] == LENGTH) and np.all(top1_stats["model_calls"] == LENGTH)
  np.testing.assert_allclose(stats["tokens_per_call"], 1.0)


def reference(joint: np.ndarray, table: np.ndarray, tau: float) -> tuple[list[int], int]:
  """Greedy learned unmasking of an all-mask row, by enumeration: (tokens, calls)."""
  fixed, calls = {}, 0
  while len(fixed) < LENGTH:
    masked = [i for i in range(LENGTH) if i not in fixed]
    conds = {i: td.conditional(joint, fixed, i) for i in masked}
    best = max(masked, key=lambda i: (conds[i].max(), -i))
    final = {i for i in masked if 1 / (1 + math.exp(-table[i, len(masked)])) >= tau}
    fixed.update({i: int(conds[i].argmax()) for i in final | {best}})
    calls += 1
  return [fixed[i] for i in range(LENGTH)], calls


def test_learned_rule_matches_enumeration_and_is_a_heuristic():
  """200 joints with random finality tables at threshold 0.7: tokens and calls equal the numpy
  rule; it decodes in parallel, and where it bets wrong it leaves sequential greedy."""
  joints, tables = joints_and_tables(200, scale=2.0)
  tokens, stats = run_many(LearnedUnmaskConfig(finality_threshold=0.7), joints, tables)
  shape = (VOCAB,) * LENGTH
  expected = [reference(np.asarray(j, np.float64).reshape(shape), np.asarray(t), 0.7)
              for j, t in zip(joints, tables)]
  np.testing.assert_array_equal(tokens, [e[0] for e in expected])
  np.testing.assert_array_equal(stats["model_calls"], [e[1] for e in expected])
  sequential, _ = run_many(unmask.UnmaskConfig(k=1), joints, tables,
                           sampler=lambda m, p, c, k, cfg: unmask.sample(m, p, c, k, cfg))
  differs = np.mean(np.any(tokens != sequential, axis=1))
  print(f"threshold 0.7, random tables: {np.mean(stats['model_calls']):.2f} calls for "
        f"{LENGTH} tokens; {differs:.1%} of rows differ from sequential greedy")
  assert np.mean(stats["model_calls"]) < LENGTH and 0 < differs < 1


def test_progress_when_nothing_is_final_and_one_call_when_everything_is():
  joint = td.random_joint(3, VOCAB, LENGTH, 2.5)
  config = LearnedUnmaskConfig(finality_threshold=0.5, sampling=T1)
  never = learned_unmask.sample(MODEL, MODEL.params(joint, np.full((4, 5), -1e4)),
                                jnp.tile(MASKS, (8, 1)), jax.random.key(0), config)
  np.testing.assert_array_equal(never.stats["model_calls"], LENGTH)
  np.testing.assert_array_equal(never.stats["row_model_calls"], 8 * LENGTH)
  greedy = LearnedUnmaskConfig(finality_threshold=0.5)
  always = learned_unmask.sample(MODEL, MODEL.params(joint, np.full((4, 5), 1e4)), MASKS,
                                 jax.random.key(0), greedy)
  assert int(always.stats["model_calls"]) == 1
  independent = [int(td.conditional(joint, {}, i).argmax()) for i in range(LENGTH)]
  np.testing.assert_array_equal(always.tokens[0], independent)
  np.testing.assert_allclose(always.stats["tokens_per_call"], LENGTH)


class MaskLovingFinality:
  """Breaks the protocol on purpose: favours the mask id, rewrites visible tokens, and calls
  every position final at random."""

  vocab_size, max_len, mask_id, block_size = 4, 6, 3, 0

  def denoise_with_finality(self, params, tokens):
    logits = jax.random.normal(jax.random.key(0), tokens.shape + (4,)).at[..., 3].set(10.0)
    return logits, jax.random.normal(jax.random.key(1), tokens.shape)

  def denoise(self, params, tokens):
    return self.denoise_with_finality(params, tokens)[0]


def test_committed_tokens_never_change_and_no_mask_remains():
  canvas = jnp.array([[0, 3, 3, 1, 3, 2], [3, 3, 3, 3, 3, 3]], jnp.int32)
  out = learned_unmask.sample(MaskLovingFinality(), None, canvas, jax.random.key(2),
                              LearnedUnmaskConfig(finality_threshold=0.6, sampling=T1))
  tokens, visible = np.asarray(out.tokens), np.asarray(canvas) != 3
  np.testing.assert_array_equal(tokens[visible], np.asarray(canvas)[visible])
  assert np.all(tokens != 3)
  np.testing.assert_array_equal(out.lengths, [3, 6])
  assert 1 <= int(out.stats["model_calls"]) <= 6


EOS, PAD = 0, 2


def eos_joints(count: int) -> jax.Array:
  """Joints where x_1 = eos is likely (weight 50), so rows with prompt x_0 often stop early."""
  boost = np.ones((VOCAB,) * LENGTH)
  boost[:, EOS] = 50.0
  joints = [td.random_joint(s, VOCAB, LENGTH, 1.5) * boost for s in range(count)]
  return jnp.asarray(np.stack([j.ravel() / j.sum() for j in joints]), jnp.float32)


@pytest.mark.parametrize("tau", [1.0, 0.6])
def test_eos_stop_pads_saves_calls_and_changes_nothing_before(tau):
  """Prompt x_0 = 1 and three masks. With the stop, a row ends once x_j = eos is committed with
  nothing masked before it: its other masks are pad, and its committed tokens are those of the
  run without the stop. At threshold 1.0 (one token per step) the calls saved equal the pads."""
  joints = eos_joints(200)
  _, tables = joints_and_tables(200, scale=2.0)
  canvas = jnp.array([[1, MASK, MASK, MASK]], jnp.int32)
  config = LearnedUnmaskConfig(finality_threshold=tau, sampling=T1)
  full, full_stats = run_many(config, joints, tables, canvas)
  stop, stats = run_many(dataclasses.replace(config, eos_id=EOS, pad_id=PAD), joints, tables,
                         canvas)
  padded = stats["eos_padded_tokens"]
  assert np.mean(padded > 0) > 0.3  # the stop does happen, often
  saved = full_stats["model_calls"] - stats["model_calls"]
  assert np.all(saved[padded > 0] >= 1) and np.all(saved[padded == 0] == 0)
  if tau == 1.0:
    np.testing.assert_array_equal(saved, padded)
  np.testing.assert_array_equal(stats["generated_tokens"], LENGTH - 1 - padded)
  for row, full_row, pads in zip(stop, full, padded):
    diff = np.nonzero(row != full_row)[0]
    if not pads:
      assert diff.size == 0
      continue
    eos_at = 1 + int(np.argmax(row[1:] == EOS))  # the first generated eos
    assert row[eos_at] == EOS and full_row[eos_at] == EOS
    assert pads <= LENGTH - 1 - eos_at
    assert np.all(diff > eos_at) and np.all(row[diff] == PAD)
  print(f"tau {tau}: {np.mean(padded > 0):.0%} of rows stopped at eos, "
        f"{np.mean(full_stats['model_calls']):.2f} -> {np.mean(stats['model_calls']):.2f} calls")


def test_rows_follow_their_keys_with_the_stop():
  """Per-row keys: a reversed batch gives reversed rows, each row equals its run alone (stop and
  call counts included), and vmap over key sets equals separate runs."""
  joint = np.asarray(eos_joints(1)[0]).reshape((VOCAB,) * LENGTH)
  _, tables = joints_and_tables(1, scale=2.0)
  params = MODEL.params(joint, tables[0])
  canvas = jnp.array([[1, 3, 3, 3], [3, 0, 3, 3], [3, 3, 3, 3], [2, 3, 3, 3]], jnp.int32)
  config = LearnedUnmaskConfig(finality_threshold=0.6, sampling=T1, eos_id=EOS, pad_id=PAD)
  keys = jax.random.split(jax.random.key(4), 4)
  forward = learned_unmask.sample(MODEL, params, canvas, keys, config)
  backward = learned_unmask.sample(MODEL, params, canvas[::-1], keys[::-1], config)
  np.testing.assert_array_equal(forward.tokens, backward.tokens[::-1])
  alone = [learned_unmask.sample(MODEL, params, canvas[i:i + 1], keys[i:i + 1], config)
           for i in range(4)]
  np.testing.assert_array_equal(forward.tokens, np.concatenate([a.tokens for a in alone]))
  assert int(forward.stats["row_model_calls"]) == sum(int(a.stats["model_calls"]) for a in alone)
  assert int(forward.stats["model_calls"]) == max(int(a.stats["model_calls"]) for a in alone)
  assert int(forward.stats["eos_padded_tokens"]) == sum(
      int(a.stats["eos_padded_tokens"]) for a in alone)
  many = jax.vmap(lambda k: learned_unmask.sample(MODEL, params, canvas, k, config))(
      jnp.stack([keys, jax.random.split(jax.random.key(5), 4)]))
  np.testing.assert_array_equal(many.tokens[0], forward.tokens)


TINY = ModelConfig(kind="learn2pd", vocab_size=12, diffusion=DiffusionConfig(mask_id=11),
                   num_layers=1, d_model=16, num_heads=2, num_kv_heads=2, mlp_dim=32, max_len=12,
                   init_std=0.5, finality=FinalityConfig(dim=8, steps=2))


def test_learn2pd_model_end_to_end():
  """The real model (random weights): prompts kept, no mask left, at most one call per token;
  threshold 1.0 equals unmask top-1 on it too. Taking as "eos" the token row 0 commits right
  after its prompt makes the stop fire there: pads after it and fewer calls."""
  model = Learn2PD(TINY)
  params = random_params(model, seed=1)
  prompt = jnp.array([[1, 2, 3], [4, 5, 0]], jnp.int32)
  canvas = canvas_lib.from_prompts(prompt, jnp.array([3, 2]), 8, TINY.diffusion.mask_id, pad_id=9)
  config = LearnedUnmaskConfig(finality_threshold=0.5)
  full = learned_unmask.sample(model, params, canvas, jax.random.key(0), config)
  tokens = np.asarray(full.tokens)
  visible = np.asarray(canvas) != TINY.diffusion.mask_id
  np.testing.assert_array_equal(tokens[visible], np.asarray(canvas)[visible])
  assert not np.any(tokens == TINY.diffusion.mask_id)
  assert 1 <= int(full.stats["model_calls"]) <= 8
  assert int(full.stats["generated_tokens"]) == 16

  one = LearnedUnmaskConfig(finality_threshold=1.0)
  single = learned_unmask.sample(model, params, canvas, jax.random.key(0), one)
  np.testing.assert_array_equal(
      single.tokens,
      unmask.sample(model, params, canvas, jax.random.key(0), unmask.UnmaskConfig(k=1)).tokens)

  eos = int(single.tokens[0, 3])
  stop = learned_unmask.sample(model, params, canvas, jax.random.key(0),
                               dataclasses.replace(one, eos_id=eos, pad_id=9))
  padded = int(stop.stats["eos_padded_tokens"])
  print(f"learn2pd random weights: {int(full.stats['model_calls'])} call(s) at threshold 0.5; "
        f"at 1.0 the eos stop spends {int(stop.stats['row_model_calls'])} row calls instead of "
        f"{int(single.stats['row_model_calls'])}, {padded} pads")
  assert padded > 0  # one token per step: each pad is a call saved
  assert stop.stats["row_model_calls"] + padded == single.stats["row_model_calls"]
  assert int(stop.stats["generated_tokens"]) + padded == 16
  stopped = np.asarray(stop.tokens)
  np.testing.assert_array_equal(stopped[0, :4], np.asarray(single.tokens)[0, :4])
  assert np.all(stopped != TINY.diffusion.mask_id)


BYTE_MODEL = dataclasses.replace(TINY, vocab_size=260, diffusion=DiffusionConfig(mask_id=259),
                                 max_len=16)


def test_generate_decode_runs_learned_unmask():
  """Through the CLI's decode path: a learn2pd model decodes text; an mdlm model is refused."""
  model = Learn2PD(BYTE_MODEL)
  params = random_params(model, seed=2)
  prompt, lengths = generate.encode_prompts(["ab", "c"], BYTE_MODEL.max_len)
  cfg = SamplerConfig(kind="learned_unmask", max_new_tokens=6, temperature=0.0,
                      finality_threshold=0.5)
  tokens, counts, stats = generate.decode(model, params, prompt, lengths, cfg)
  assert tokens.shape == (2, 6) and np.all(counts >= 1) and np.all(counts <= 6)
  assert stats["sampler"] == "learned_unmask" and 1 <= stats["model_calls"] <= 6
  assert stats["generated_tokens"] + stats["eos_padded_tokens"] == 12
  with pytest.raises(UserError, match="needs a denoiser with a finality head"):
    generate.decode(MaskedDiffusionLM(dataclasses.replace(BYTE_MODEL, kind="mdlm")), params,
                    prompt, lengths, cfg)


def test_bad_input_is_a_clear_error():
  with pytest.raises(ValueError, match=r"finality_threshold must be in \(0, 1\]"):
    LearnedUnmaskConfig(finality_threshold=0.0)
  with pytest.raises(ValueError, match="confidence 'best' is unknown"):
    LearnedUnmaskConfig(confidence="best")
  plain = td.TabularDenoiser(VOCAB, LENGTH)
  with pytest.raises(ValueError, match="needs a FinalityDenoiser"):
    learned_unmask.sample(plain, plain.params(td.random_joint(0, VOCAB, LENGTH)), MASKS,
                          jax.random.key(0), LearnedUnmaskConfig())
  with pytest.raises(ValueError, match="eos_id=3 is the model's mask id"):
    learned_unmask.sample(MODEL, MODEL.params(td.random_joint(0, VOCAB, LENGTH)), MASKS,
                          jax.random.key(0), LearnedUnmaskConfig(eos_id=MASK))
  with pytest.raises(UserError, match=r"sampler.kind=learned_unmask: finality_threshold must be in \(0, 1\]"):
    config_lib.validate(config_lib.Experiment(
        sampler=SamplerConfig(kind="learned_unmask", finality_threshold=1.5)))

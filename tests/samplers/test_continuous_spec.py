"""Speculative rounds in continuous batches: greedy requests equal their batch-1 AR decode under
any mix of AR steps, fixed-gamma rounds and TETRIS selection; sampled requests follow their keys
whatever their slot; the draft's cache is caught up after AR steps; TETRIS's selection and its
sampled exactness (an eight-token joint oracle, with a leak caught); bad settings are named."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.causal_lm import CausalLM
from models.config import ModelConfig
from samplers import ar, continuous, continuous_spec, draft_selection
from samplers.core import verify
from samplers.core.logits import SamplingParams
from tests.models.random_params import random_params
from tests.samplers import continuous_oracle, prefix_toy
from tests.samplers.oracle import POWER, SIGNIFICANCE
from tests.samplers.test_continuous import KEYS, LIMITS, MODEL, PROMPTS, serve

G = 3


def _params():
  """A target and a draft near it (most drafts accepted, some rejected)."""
  target = random_params(MODEL)
  noise = jax.tree.map(lambda x: 0.01 * jax.random.normal(jax.random.key(1), x.shape, x.dtype),
                       target)
  return target, jax.tree.map(jnp.add, target, noise)


def _serve(target, draft, order, config, program):
  return serve(target, order, config, program, MODEL, draft)


def _config(slots, sampling):
  return continuous.ContinuousConfig(num_slots=slots, max_new_tokens=12, prompt_width=8,
                                     sampling=sampling, max_draft_tokens=G)


def _propose_and_verify(target, draft, slots, config, costs, calibration=1.0):
  slots, proposal = continuous_spec.propose(MODEL, draft, slots, config, 4, costs,
                                            calibration=calibration)
  return continuous_spec.verify_proposal(MODEL, target, slots, config, proposal,
                                         int(proposal["width"]))


def _propose_and_verify_packed(target, draft, slots, config, costs):
  sizes = (2, 4, 6, 8)  # 2 slots x (w + 1) tokens, w = 0..G
  slots, proposal = continuous_spec.propose(MODEL, draft, slots, config, 4, costs, sizes=sizes)
  return continuous_spec.verify_proposal(MODEL, target, slots, config, proposal,
                                         sizes[int(proposal["width"])], packed=True)


def _two_filled_slots(target, draft, config):
  """Slots holding the first two prompts, target and draft caches prefilled."""
  prompt, lengths = ar.pad_prompts([PROMPTS[0], PROMPTS[1]])
  prompt = jnp.pad(prompt, ((0, 0), (0, config.prompt_width - prompt.shape[1])))
  return continuous.fill(MODEL, target, prompt, lengths, KEYS[:2], jnp.asarray([12, 12]),
                         config, MODEL, draft)


def _programs(target, draft, config):
  costs = jnp.asarray([1.0, 1.1, 1.2, 1.3])
  return {
      "tetris, packed": lambda s, i: _propose_and_verify_packed(target, draft, s, config, costs),
      "fixed gamma": lambda s, i: continuous_spec.speculate(MODEL, target, MODEL, draft, s,
                                                            config, gamma=2),
      "tetris": lambda s, i: continuous_spec.select(MODEL, target, MODEL, draft, s, config,
                                                    budget=4, costs=costs),
      "tetris, two programs": lambda s, i: _propose_and_verify(target, draft, s, config, costs),
      "mixed": lambda s, i: (continuous.step(MODEL, target, s, config, steps=2) if i % 3 == 0
                             else continuous_spec.speculate(MODEL, target, MODEL, draft, s,
                                                            config, gamma=1 + i % 3)),
  }


@pytest.mark.parametrize("policy", ["fixed gamma", "tetris", "tetris, two programs",
                                    "tetris, packed", "mixed"])
def test_greedy_requests_equal_their_batch_one_ar_decode(policy):
  target, draft = _params()
  greedy = SamplingParams(temperature=0.0)
  want = [np.asarray(ar.sample(MODEL, target, *ar.pad_prompts([p]), KEYS[i][None],
                               ar.ARConfig(max_new_tokens=LIMITS[i], sampling=greedy)).tokens[0])
          for i, p in enumerate(PROMPTS)]
  config = _config(2, greedy)
  got, slots = _serve(target, draft, [0, 1, 2, 3, 4], config,
                      _programs(target, draft, config)[policy])
  for i in range(len(PROMPTS)):
    np.testing.assert_array_equal(got[i][:LIMITS[i]], want[i], err_msg=f"request {i}")
    assert np.all(got[i][LIMITS[i]:] == config.pad_id)
  assert 0 < int(slots.accepted) < int(slots.drafted)  # drafts accepted and rejected


def test_sampled_requests_follow_their_keys_whatever_their_slot():
  target, draft = _params()
  outs = []
  for slots, order in [(2, [0, 1, 2, 3, 4]), (3, [4, 3, 2, 1, 0])]:
    config = _config(slots, SamplingParams(temperature=1.0))
    outs.append(_serve(target, draft, order, config,
                       _programs(target, draft, config)["fixed gamma"])[0])
  for i in range(len(PROMPTS)):
    np.testing.assert_array_equal(outs[0][i], outs[1][i], err_msg=f"request {i}")


def test_two_program_tetris_rounds_equal_one_program_rounds_when_sampled():
  """`propose` + `verify_proposal` (the serving engine's round) is `select` split in two."""
  target, draft = _params()
  config = _config(2, SamplingParams(temperature=1.0))
  programs = _programs(target, draft, config)
  one = _serve(target, draft, [0, 1, 2, 3, 4], config, programs["tetris"])[0]
  two = _serve(target, draft, [0, 1, 2, 3, 4], config, programs["tetris, two programs"])[0]
  for i in range(len(PROMPTS)):
    np.testing.assert_array_equal(one[i], two[i], err_msg=f"request {i}")


def test_a_packed_verify_commits_what_the_dense_verify_commits_when_sampled():
  """The same proposal verified by a token-packed call (the chosen drafts alone) and by the
  dense call at its width commits the same tokens and counts: the packed logits are the dense
  ones, so packed TETRIS keeps the target's distribution."""
  target, draft = _params()
  config = _config(2, SamplingParams(temperature=1.0))
  slots = _two_filled_slots(target, draft, config)
  for lengths in ([3, 1], [0, 2], [2, 3]):  # ragged: the dense call verifies at width 3
    slots, proposal = continuous_spec.propose(MODEL, draft, slots, config, 4,
                                              jnp.asarray([1.0, 1.1, 1.2, 1.3]))
    proposal = proposal | {"lengths": jnp.asarray(lengths, jnp.int32)}
    copy = jax.tree.map(jnp.copy, slots)
    dense = continuous_spec.verify_proposal(MODEL, target, copy, config, proposal, G)
    packed = continuous_spec.verify_proposal(MODEL, target, slots, config, proposal, 2 * (G + 1),
                                             packed=True)
    for field in ("seq", "n", "accepted", "drafted", "rejected"):
      np.testing.assert_array_equal(getattr(packed, field), getattr(dense, field), err_msg=field)
    slots = packed


def test_packed_selection_spends_the_size_on_the_likeliest_drafts():
  confidence = jnp.asarray([[0.9, 0.9, 0.9], [0.5, 0.9, 0.9], [0.99, 0.1, 0.9]])
  active = jnp.asarray([True, True, True])
  sizes = (3, 5, 7, 9, 12)
  # chain values: [.9 .81 .729], [.5 .45 .405], [.99 .099 .089]; flat costs: the largest size
  lengths, k = draft_selection.packed_selection(confidence, active, 9, sizes, jnp.ones(5))
  np.testing.assert_array_equal(lengths, [3, 3, 3])
  assert int(k) == 4
  # 7 tokens hold the 3 last tokens and the 4 likeliest drafts: .99 .9 .81 .729 (a dense
  # width would give the second slot drafts too); a size that costs more than it earns is cut
  lengths, k = draft_selection.packed_selection(confidence, active, 9, sizes,
                                                jnp.asarray([1.0, 1.2, 1.4, 9.0, 9.0]))
  np.testing.assert_array_equal(lengths, [3, 0, 1])
  assert int(k) == 2
  lengths, k = draft_selection.packed_selection(confidence, active, 2, sizes, jnp.ones(5))
  np.testing.assert_array_equal(lengths, [1, 0, 1])  # the budget caps the drafts
  lengths, _ = draft_selection.packed_selection(confidence, jnp.asarray([False, True, True]), 9,
                                                sizes, jnp.ones(5))
  assert int(lengths[0]) == 0  # a free slot drafts nothing


def test_calibration_scales_each_draft_before_the_chain_product():
  confidence = jnp.asarray([[0.5, 0.8, 0.9], [0.2, 0.2, 0.2]])
  active = jnp.asarray([True, False])
  values = draft_selection.chain_values(confidence, active, 1.5)
  np.testing.assert_allclose(values[0], [0.75, 0.75, 0.75 * 1.0], rtol=1e-6)  # 1.2, 1.35 -> 1
  np.testing.assert_array_equal(values[1], [-1, -1, -1])  # a free slot
  # a calibrated draft earns a wider verify than the raw one under the same costs
  costs = jnp.asarray([1.0, 1.6, 2.0, 2.4])
  _, raw = draft_selection.selection(confidence, active, 3, costs)
  _, calibrated = draft_selection.selection(confidence, active, 3, costs, 1.5)
  assert int(raw) == 0 and int(calibrated) == 3


@pytest.mark.parametrize("wide", [0, 4, 64])  # no wide calls; wide calls, then chunks; one call
def test_catch_up_gives_the_draft_the_cache_a_prefill_would(wide):
  target, draft = _params()
  config = _config(2, SamplingParams(temperature=0.0))
  slots = _two_filled_slots(target, draft, config)
  lag = int(continuous_spec.draft_lag(slots))
  slots = continuous.step(MODEL, target, slots, config, steps=7)  # the draft falls 7 behind
  assert int(continuous_spec.draft_lag(slots)) == lag + 7
  caught = continuous_spec.catch_up(MODEL, draft, slots, chunk=2, wide=wide)
  want = slots.context - 2
  np.testing.assert_array_equal(caught.draft_length, want)
  assert int(continuous_spec.draft_lag(caught)) == 0
  fresh = MODEL.apply(draft, slots.seq, jnp.broadcast_to(jnp.arange(slots.seq.shape[1]),
                                                         slots.seq.shape),
                      MODEL.init_cache(2, config.cache_len))[0]
  at = want[:, None]
  got = MODEL.apply(draft, jnp.take_along_axis(slots.seq, at, axis=1), at,
                    caught.draft_cache.replace(lengths=want))[0][:, 0]
  np.testing.assert_allclose(got, jnp.take_along_axis(fresh, at[..., None], axis=1)[:, 0],
                             rtol=1e-5, atol=1e-5)
  fed_keys = [np.asarray(k) for k in caught.draft_cache.keys]  # `catch_up_from` donates slots
  recent = (jnp.arange(config.cache_len) >= want[:, None] - 5)[:, None, :, None]  # [S, 1, L, 1]
  wiped = caught.draft_cache.replace(keys=tuple(jnp.where(recent, 0.0, k)
                                                for k in caught.draft_cache.keys))
  again = continuous_spec.catch_up_from(MODEL, draft, caught.replace(draft_cache=wiped),
                                        behind=5, chunk=2)  # a cost probe: re-feeds the last 5
  np.testing.assert_array_equal(again.draft_length, want)
  for got, fed in zip(again.draft_cache.keys, fed_keys):  # writes past a row's length: unread
    for row, end in enumerate(np.asarray(want)):
      np.testing.assert_allclose(got[row, :, :end], fed[row, :, :end], rtol=1e-5, atol=1e-5)


def test_selection_verifies_the_likeliest_drafts_under_the_budget():
  confidence = jnp.asarray([[0.9, 0.9, 0.9], [0.5, 0.9, 0.9], [0.99, 0.1, 0.9]])
  active = jnp.asarray([True, True, True])
  flat = jnp.ones(4)
  lengths, width = draft_selection.selection(confidence, active, 4, flat)
  # chain values: [.9 .81 .729], [.5 .45 .405], [.99 .099 .089]: the top 4 are .99 .9 .81 .729
  np.testing.assert_array_equal(lengths, [3, 0, 1])
  assert int(width) == 3
  # a verify width that costs more than it earns is cut: width 1 earns 3 + .9 + .99 per 1.0
  lengths, width = draft_selection.selection(confidence, active, 4, jnp.asarray([1, 1, 3, 9.]))
  np.testing.assert_array_equal(lengths, [1, 0, 1])
  assert int(width) == 1
  lengths, _ = draft_selection.selection(confidence, jnp.asarray([False, True, True]), 9, flat)
  assert int(lengths[0]) == 0  # a free slot drafts nothing


def test_bad_settings_are_named():
  target, draft = _params()
  config = _config(2, SamplingParams(temperature=0.0))
  slots = continuous.init(MODEL, config, MODEL)
  with pytest.raises(ValueError, match=r"gamma must be in \[1, max_draft_tokens = 3\]"):
    continuous_spec.speculate(MODEL, target, MODEL, draft, slots, config, gamma=4)
  with pytest.raises(ValueError, match="budget .* must be >= 1"):
    continuous_spec.select(MODEL, target, MODEL, draft, slots, config, budget=0,
                           costs=jnp.ones(G + 1))
  with pytest.raises(ValueError, match=r"one time per verify width 0..3, shape \(4,\)"):
    continuous_spec.select(MODEL, target, MODEL, draft, slots, config, budget=2,
                           costs=jnp.ones(G))
  with pytest.raises(ValueError, match=r"one time per packed size \(2, 4\), shape \(2,\)"):
    continuous_spec.propose(MODEL, draft, slots, config, 2, jnp.ones(G + 1), sizes=(2, 4))
  with pytest.raises(ValueError, match="sizes .* must be increasing"):
    continuous_spec.propose(MODEL, draft, slots, config, 2, jnp.ones(2), sizes=(4, 2))
  with pytest.raises(ValueError, match=r"smallest packed call \(1 tokens\) must hold"):
    continuous_spec.propose(MODEL, draft, slots, config, 2, jnp.ones(2), sizes=(1, 4))
  with pytest.raises(ValueError, match="max_draft_tokens must be >= 0"):
    continuous.ContinuousConfig(num_slots=2, max_new_tokens=4, prompt_width=8,
                                max_draft_tokens=-1)
  with pytest.raises(ValueError, match=r"\+ max_draft_tokens 3 = 64 exceeds the draft's"):
    small = CausalLM(ModelConfig(vocab_size=32, num_layers=1, d_model=32, num_heads=4,
                                 num_kv_heads=2, mlp_dim=64, max_len=32))
    continuous.init(MODEL, continuous.ContinuousConfig(2, 53, 8, max_draft_tokens=3), small)


# The oracle: every request of a continuous batch of ROWS per prompt, decoded by TETRIS rounds
# (every draft in the budget: a binding budget is for greedy decoding) with an AR step every
# third call, against the exact joint.
VOCAB, STEPS, ROWS = 3, 8, 100_000
TOY = prefix_toy.PrefixLM(vocab_size=VOCAB, max_len=20)
TOY_TARGET = TOY.init(jax.random.key(1))
TOY_DRAFT = {"table": TOY_TARGET["table"] + jax.random.normal(jax.random.key(2), (101, VOCAB)),
             "mult": TOY_TARGET["mult"]}
TOY_PROMPTS = [[1, 2, 0], [2]]


def toy_slots(key, rows: int, max_draft_tokens: int, steps: int = STEPS):
  """(config, slots): `rows` slots per prompt of TOY_PROMPTS (prompt-major), target and draft
  prefilled, each asking for `steps` tokens at T = 1 (the joint oracles' start)."""
  count = len(TOY_PROMPTS) * rows
  config = continuous.ContinuousConfig(num_slots=count, max_new_tokens=steps, prompt_width=3,
                                       sampling=SamplingParams(temperature=1.0),
                                       max_draft_tokens=max_draft_tokens)
  prompt, lengths = ar.pad_prompts([p for p in TOY_PROMPTS for _ in range(rows)])
  return config, continuous.fill(TOY, TOY_TARGET, prompt, lengths, jax.random.split(key, count),
                                 jnp.full(count, steps), config, TOY, TOY_DRAFT)


@jax.jit
def _toy_decode(key):
  config, slots = toy_slots(key, ROWS, G)
  costs = jnp.asarray([1.0, 1.05, 1.1, 1.15])

  tetris = lambda s: continuous_spec.select(TOY, TOY_TARGET, TOY, TOY_DRAFT, s, config,
                                            budget=2 * ROWS * G, costs=costs)
  step = lambda s: continuous.step(TOY, TOY_TARGET, s, config)
  slots = continuous_oracle.cycle_until_done([tetris, tetris, step], slots)  # AR every third
  return continuous.generated(slots, config), slots.accepted, slots.drafted


def _toy_p_values():
  tokens, accepted, drafted = _toy_decode(jax.random.key(0))
  p_values = continuous_oracle.joint_p_values(tokens, TOY_PROMPTS, TOY_TARGET, STEPS)
  return p_values, int(accepted), int(drafted)


@pytest.mark.slow
def test_tetris_with_ar_steps_follows_the_exact_joint():
  p_values, accepted, drafted = _toy_p_values()
  print(f"continuous TETRIS: p-values {p_values}, {accepted} of {drafted} drafts accepted")
  assert min(p_values) > SIGNIFICANCE, p_values
  assert drafted - accepted > 2 * ROWS  # rejections, with rollbacks, in most rows


@pytest.mark.slow
def test_tetris_with_a_leak_in_the_residual_is_caught(fresh_trace):
  normalise = verify._normalise
  fresh_trace.setattr(verify, "_normalise",
                      lambda mass, fallback: normalise(mass + 0.03 * fallback, fallback))
  p_values = _toy_p_values()[0]
  assert max(p_values) < POWER, p_values

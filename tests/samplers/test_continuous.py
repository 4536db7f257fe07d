"""Continuous batching: a request's tokens are its batch-1 AR decode with its own key, whatever
its slot, its neighbours and when it was admitted (greedy and sampled), also when its prompt is
prefilled in chunks beside decoding; bad settings are named."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.causal_lm import CausalLM
from models.config import ModelConfig
from samplers import ar, chunked_prefill, continuous
from samplers.core.logits import SamplingParams
from tests.models.random_params import random_params

MODEL = CausalLM(ModelConfig(vocab_size=32, num_layers=2, d_model=32, num_heads=4,
                             num_kv_heads=2, mlp_dim=64, max_len=64, init_std=0.5,
                             tie_embeddings=False))
PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [3, 3, 3, 1], [9], [4, 4, 2]]
LIMITS = [10, 6, 12, 3, 1]
KEYS = jax.random.split(jax.random.key(7), len(PROMPTS))


def serve(params, order, config, program, draft=None, draft_params=None, admit=None):
  """Admits the requests in `order` into free slots (`continuous.admit`, or `admit(slots, slot,
  request index)`) and runs `program(slots, call index)` between checks; returns (each request's
  tokens, the final slots)."""
  def one_shot(slots, slot, i):
    prompt = np.zeros(config.prompt_width, np.int32)
    prompt[:len(PROMPTS[i])] = PROMPTS[i]
    return continuous.admit(MODEL, params, slots, jnp.int32(slot), jnp.asarray(prompt),
                            jnp.int32(len(PROMPTS[i])), KEYS[i], jnp.int32(LIMITS[i]), config,
                            draft, draft_params)

  slots = continuous.init(MODEL, config, draft)
  waiting, owner, out, calls = list(order), {}, {}, 0
  while waiting or owner:
    active, n = np.asarray(slots.active), np.asarray(slots.n)
    for slot in range(config.num_slots):
      if slot in owner and not active[slot] and n[slot] >= 1:  # n = 0: still prefilling
        out[owner.pop(slot)] = np.asarray(continuous.generated(slots, config)[slot])
      if slot not in owner and waiting:
        owner[slot] = waiting.pop(0)
        slots = (admit or one_shot)(slots, slot, owner[slot])
    slots, calls = program(slots, calls), calls + 1
  return out, slots


def _serve(params, order, config, steps):
  return serve(params, order, config,
               lambda slots, _: continuous.step(MODEL, params, slots, config, steps=steps))[0]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_requests_equal_their_batch_one_ar_decode_whatever_their_slot(temperature):
  params = random_params(MODEL)
  sampling = SamplingParams(temperature=temperature)
  want = [np.asarray(ar.sample(MODEL, params, *ar.pad_prompts([p]), KEYS[i][None],
                               ar.ARConfig(max_new_tokens=LIMITS[i], sampling=sampling)).tokens[0])
          for i, p in enumerate(PROMPTS)]
  for slots, order, steps in [(2, [0, 1, 2, 3, 4], 2), (3, [4, 3, 2, 1, 0], 1)]:
    config = continuous.ContinuousConfig(num_slots=slots, max_new_tokens=12, prompt_width=8,
                                         sampling=sampling)
    got = _serve(params, order, config, steps)
    for i in range(len(PROMPTS)):
      np.testing.assert_array_equal(got[i][:LIMITS[i]], want[i], err_msg=f"request {i}")
      assert np.all(got[i][LIMITS[i]:] == config.pad_id)


def test_eos_ends_a_request_and_bad_settings_are_named():
  params = random_params(MODEL)
  greedy = SamplingParams(temperature=0.0)
  plain = continuous.ContinuousConfig(num_slots=2, max_new_tokens=12, prompt_width=8,
                                      sampling=greedy)
  tokens = _serve(params, [0], plain, 4)[0]
  eos = int(tokens[3])  # request 0's fourth token, made its eos
  config = continuous.ContinuousConfig(num_slots=2, max_new_tokens=12, prompt_width=8,
                                       sampling=greedy, eos_id=eos)
  ended = _serve(params, [0], config, 4)[0]
  stop = list(tokens).index(eos) + 1
  np.testing.assert_array_equal(ended[:stop], tokens[:stop])
  assert np.all(ended[stop:] == config.pad_id)
  with pytest.raises(ValueError, match="exceeds the target.s max_len 64"):
    continuous.init(MODEL, continuous.ContinuousConfig(num_slots=2, max_new_tokens=60,
                                                       prompt_width=8))
  with pytest.raises(ValueError, match="num_slots and prompt_width must be >= 1"):
    continuous.ContinuousConfig(num_slots=0, max_new_tokens=4, prompt_width=8)


def test_a_prompt_piggybacked_in_chunks_gets_the_one_shot_cache_and_the_same_tokens():
  """Slot 1's prompt enters in chunks of 2 carried by slot 0's decode steps: its cache and first
  token equal a one-shot prefill's, and slot 0 decodes as it would alone."""
  params = random_params(MODEL)
  greedy = SamplingParams(temperature=0.0)
  config = continuous.ContinuousConfig(num_slots=2, max_new_tokens=12, prompt_width=8,
                                       sampling=greedy)
  prompt = np.zeros(8, np.int32)
  prompt[:5] = PROMPTS[0]
  args = (jnp.asarray(prompt), jnp.int32(5), KEYS[0], jnp.int32(LIMITS[0]))
  draft = dict(draft=MODEL, draft_params=jax.tree.map(lambda x: x * 0.9, params))
  one_shot = continuous.admit(MODEL, params, continuous.init(MODEL, config, MODEL), jnp.int32(1),
                              *args, config, **draft)
  other = (jnp.asarray(prompt), jnp.int32(5), KEYS[1], jnp.int32(LIMITS[1]))
  start = continuous.admit(MODEL, params, continuous.init(MODEL, config), jnp.int32(0), *other,
                           config)
  alone = continuous.step(MODEL, params, start, config, steps=3)
  slots = chunked_prefill.enqueue(
      continuous.admit(MODEL, params, continuous.init(MODEL, config, MODEL), jnp.int32(0),
                       *other, config, **draft), jnp.int32(1), *args, config)
  for _ in range(3):  # chunks of 2: positions 0-1, 2-3, 4 (the third completes the prompt)
    assert not bool(slots.active[1])
    slots = chunked_prefill.step_piggybacked(MODEL, params, slots, jnp.asarray([1]), config,
                                             chunk=2, **draft)
  assert bool(slots.active[1]) and int(slots.n[1]) == 1 and int(slots.prefilled[1]) == 5
  assert int(slots.draft_length[1]) == int(one_shot.draft_length[1]) == 4
  for got, want in zip(slots.cache.keys + slots.cache.values + slots.draft_cache.keys,
                       one_shot.cache.keys + one_shot.cache.values + one_shot.draft_cache.keys):
    np.testing.assert_allclose(got[1, :, :5], want[1, :, :5], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(slots.seq[1], one_shot.seq[1])  # the same first token
  np.testing.assert_array_equal(slots.seq[0], alone.seq[0])
  np.testing.assert_array_equal(slots.n[0], alone.n[0])
  with pytest.raises(ValueError, match=r"chunk must be in \[1, max_new_tokens \+ max_draft_"):
    chunked_prefill.step_piggybacked(MODEL, params, slots, jnp.asarray([1]), config, chunk=13,
                                     **draft)
  with pytest.raises(ValueError, match="steps must be >= 1"):
    chunked_prefill.step_piggybacked(MODEL, params, slots, jnp.asarray([1]), config, chunk=2,
                                     steps=0)
  with pytest.raises(ValueError, match="needs a model with apply_step_with_chunks"):
    chunked_prefill.step_piggybacked(object(), params, slots, jnp.asarray([1]), config, chunk=2)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_requests_piggybacked_beside_decoding_equal_their_ar_decode(temperature):
  """Prompts fed 2 tokens per call inside 2-step calls, one or two chunks a call (a padding chunk
  row when only one prompt is pending), with a draft's cache fed too."""
  params = random_params(MODEL)
  sampling = SamplingParams(temperature=temperature)
  config = continuous.ContinuousConfig(num_slots=3, max_new_tokens=12, prompt_width=8,
                                       sampling=sampling)
  want = [np.asarray(ar.sample(MODEL, params, *ar.pad_prompts([p]), KEYS[i][None],
                               ar.ARConfig(max_new_tokens=LIMITS[i], sampling=sampling)).tokens[0])
          for i, p in enumerate(PROMPTS)]
  pending = []  # [slot, prompt tokens not yet fed]

  def enqueue(slots, slot, i):
    prompt = np.zeros(config.prompt_width, np.int32)
    prompt[:len(PROMPTS[i])] = PROMPTS[i]
    pending.append([slot, len(PROMPTS[i])])
    return chunked_prefill.enqueue(slots, jnp.int32(slot), jnp.asarray(prompt),
                                   jnp.int32(len(PROMPTS[i])), KEYS[i], jnp.int32(LIMITS[i]),
                                   config)

  def program(slots, call):
    if not pending:
      return continuous.step(MODEL, params, slots, config, steps=2)
    fed = pending[:1 + call % 2]
    slot = [s for s, _ in fed] + [config.num_slots] * (2 - len(fed))
    slots = chunked_prefill.step_piggybacked(MODEL, params, slots, jnp.asarray(slot), config,
                                             chunk=2, steps=2, draft=MODEL, draft_params=params)
    for entry in fed:
      entry[1] -= 2
    pending[:] = [entry for entry in pending if entry[1] > 0]
    return slots

  out = serve(params, [0, 1, 2, 3, 4], config, program, admit=enqueue, draft=MODEL,
              draft_params=params)[0]
  for i in range(len(PROMPTS)):
    np.testing.assert_array_equal(out[i][:LIMITS[i]], want[i], err_msg=f"request {i}")


def test_a_step_on_the_first_rows_leaves_the_others_and_matches_a_step_on_all():
  params = random_params(MODEL)
  config = continuous.ContinuousConfig(num_slots=3, max_new_tokens=12, prompt_width=8,
                                       sampling=SamplingParams(temperature=0.0))
  prompt, lengths = ar.pad_prompts(PROMPTS[:3])
  prompt = jnp.pad(prompt, ((0, 0), (0, 8 - prompt.shape[1])))
  fresh = lambda: continuous.fill(MODEL, params, prompt, lengths, KEYS[:3], jnp.asarray(LIMITS[:3]),
                                  config)
  before = fresh()
  on_two = continuous.step(MODEL, params, fresh(), config, steps=3, rows=2)
  on_all = continuous.step(MODEL, params, fresh(), config, steps=3)
  np.testing.assert_array_equal(on_two.n, [4, 4, 1])  # slot 2 did not move
  np.testing.assert_array_equal(on_two.seq[2], before.seq[2])
  np.testing.assert_array_equal(on_two.seq[:2], on_all.seq[:2])
  np.testing.assert_array_equal(on_two.cache.keys[0][2], before.cache.keys[0][2])

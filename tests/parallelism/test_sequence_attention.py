"""Sequence-parallel attention equals dense attention, forward and gradient, on 8 host devices.

Tolerances (float32): outputs within 1e-5, gradients within 1e-4 (absolute; values are O(1)).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from models.attention import attend
from models.causal_lm import CausalLM
from models.config import DraftHeadsConfig, ModelConfig
from models.eagle import EagleLM
from parallelism import rules
from parallelism.mesh import make_mesh
from parallelism.sequence_attention import VARIANTS, attention
from samplers import ar, eagle, lookahead, prompt_lookup
from samplers.core.logits import SamplingParams
from tests.models.random_params import random_params

FWD_TOL, GRAD_TOL = 1e-5, 1e-4
# The model tests' logits reach ~10 through two layers of init_std 0.5 weights; there even dense
# attention on the mesh differs from one device by ~1e-5, so they compare within 1e-4.
MODEL_TOL = 1e-4
# T = 32 splits into 2 x 8 zig-zag chunks; H = 8 splits over sequence x tensor for Ulysses;
# KVH = 2 is fewer than the sequence axis (Ulysses repeats it); block 4 makes ring steps tile.
BATCH, STEPS, HEADS, KV_HEADS, HEAD_DIM, BLOCK = 2, 32, 8, 2, 8, 4
MESHES = [(1, 1, 8, 1), (1, 2, 4, 1), (2, 1, 2, 2)]  # (data, fsdp, sequence, tensor)


def _normal(seed, *shape):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


@pytest.fixture(scope="module")
def inputs():
  """q, k, v and the weights w of the scalar loss sum(out * w)."""
  return (_normal(0, BATCH, STEPS, HEADS, HEAD_DIM), _normal(1, BATCH, STEPS, KV_HEADS, HEAD_DIM),
          _normal(2, BATCH, STEPS, KV_HEADS, HEAD_DIM), _normal(3, BATCH, STEPS, HEADS, HEAD_DIM))


def _value_and_grads(fn, inputs):
  """(fn(q, k, v), d sum(fn * w) / d(q, k, v)), one jit."""
  q, k, v, w = inputs
  loss = lambda q, k, v: (jnp.sum(fn(q, k, v) * w), fn(q, k, v))
  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return out, grads


@pytest.fixture(scope="module")
def dense(inputs):
  """causal -> the reference (out, grads) of models.attention.attend on one device."""
  def reference(causal):
    mask = jnp.tril(jnp.ones((1, STEPS, STEPS), bool)) if causal else jnp.ones((1, 1, 1), bool)
    return _value_and_grads(lambda q, k, v: attend(q, k, v, mask), inputs)
  return {causal: reference(causal) for causal in (True, False)}


def _assert_close(actual, expected):
  out, grads = actual
  np.testing.assert_allclose(out, expected[0], atol=FWD_TOL, rtol=0)
  for name, got, want in zip("qkv", grads, expected[1]):
    np.testing.assert_allclose(got, want, atol=GRAD_TOL, rtol=0, err_msg=f"d{name}")


def _cases():
  """Every variant x mesh x mask; non-causal off the data x tensor mesh is slow (compile-bound)."""
  for kind in VARIANTS:
    for shape in MESHES:
      for causal in (True, False):
        marks = [] if causal or shape == MESHES[-1] else [pytest.mark.slow]
        name = f"{kind}-{'x'.join(map(str, shape))}-{'causal' if causal else 'full'}"
        yield pytest.param(kind, shape, causal, marks=marks, id=name)


@pytest.mark.parametrize("kind, mesh_shape, causal", list(_cases()))
def test_variant_equals_dense(kind, mesh_shape, causal, inputs, dense):
  mesh = make_mesh(*mesh_shape)
  with rules.activate(mesh):
    actual = _value_and_grads(
        lambda q, k, v: attention(q, k, v, kind=kind, causal=causal, block=BLOCK), inputs)
  _assert_close(actual, dense[causal])


def test_without_a_sequence_axis_every_variant_is_dense(inputs, dense):
  q, k, v, _ = inputs
  for kind in VARIANTS:
    np.testing.assert_allclose(attention(q, k, v, kind=kind), dense[True][0], atol=FWD_TOL)


@pytest.mark.parametrize("kind, mesh_shape, shape, message", [
    ("ulysses", (1, 1, 8, 1), (32, 4, 2), r"num_heads=4, sequence=8 x tensor=1 = 8"),
    ("ulysses", (2, 1, 2, 2), (32, 6, 2), r"num_heads=6, sequence=2 x tensor=2 = 4"),
    ("allgather", (1, 1, 4, 2), (32, 3, 1), r"num_heads=3, tensor=2"),
    ("ring", (1, 1, 8, 1), (24, 8, 2), r"length=24, 2 x sequence = 16"),
    ("allgather", (1, 1, 8, 1), (20, 8, 2), r"length=20, sequence=8"),
], ids=["ulysses-heads", "ulysses-heads-tensor", "tensor-heads", "ring-length",
        "allgather-length"])
def test_unsupported_shapes_are_rejected_by_name(kind, mesh_shape, shape, message):
  steps, heads, kv_heads = shape
  q = jax.ShapeDtypeStruct((2, steps, heads, HEAD_DIM), jnp.float32)
  kv = jax.ShapeDtypeStruct((2, steps, kv_heads, HEAD_DIM), jnp.float32)
  with rules.activate(make_mesh(*mesh_shape)):
    with pytest.raises(ValueError, match=message):
      jax.eval_shape(lambda *a: attention(*a, kind=kind), q, kv, kv)


def test_unknown_variant_names_the_valid_ones(inputs):
  with pytest.raises(ValueError, match="valid: ring, allgather, ulysses"):
    attention(*inputs[:3], kind="flash")


def test_ring_backward_keeps_no_per_step_scores():
  """Compiled temporaries per device at T = 2048 on 8 devices: ring < 0.1 x single-device dense
  (measured: 0.018).

  A backward that saved every ring step's [T/8, T/8] probabilities (or dense attention split 8
  ways) would need about dense / 8; the recomputing backward keeps O(T/8) rows and one tile.
  """
  steps, heads, head_dim = 2048, 4, 16
  spec = lambda sharding=None: jax.ShapeDtypeStruct((1, steps, heads, head_dim), jnp.float32,
                                                    sharding=sharding)
  grad = lambda fn: jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) ** 2), argnums=(0, 1, 2)))
  temp = lambda fn, *args: grad(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes
  causal = jnp.tril(jnp.ones((1, steps, steps), bool))
  dense_bytes = temp(lambda q, k, v: attend(q, k, v, causal), spec(), spec(), spec())
  mesh = make_mesh(1, 1, 8, 1)
  sharded = spec(NamedSharding(mesh, PartitionSpec(None, "sequence")))
  with rules.activate(mesh):
    ring_bytes = temp(lambda q, k, v: attention(q, k, v, kind="ring"), sharded, sharded, sharded)
  assert ring_bytes < 0.1 * dense_bytes, (ring_bytes, dense_bytes)


# A model whose heads split over sequence x tensor; untied with a large init so that greedy
# decoding is context-sensitive (see tests/samplers/test_ar.py).
MODEL = ModelConfig(vocab_size=32, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2,
                    mlp_dim=64, max_len=24, init_std=0.5, tie_embeddings=False)


@pytest.fixture(scope="module")
def params():
  return random_params(CausalLM(MODEL))


def test_model_with_ring_attention_equals_dense_forward_and_grad(params):
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 32, (2, 16)), jnp.int32)

  def loss(model, params):
    logits = model.logits(params, tokens)
    return -jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits

  run = lambda model: jax.jit(jax.value_and_grad(lambda p: loss(model, p), has_aux=True))(params)
  (_, expected), expected_grads = run(CausalLM(MODEL))
  with rules.activate(make_mesh(data=2, sequence=4)):
    (_, logits), grads = run(CausalLM(dataclasses.replace(MODEL, attention="ring")))
  np.testing.assert_allclose(logits, expected, atol=MODEL_TOL)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=MODEL_TOL), grads, expected_grads)


def test_sampling_with_sequence_parallel_prefill_equals_dense(params):
  """Ragged prompts of length 5 (padded to 8 for the zig-zag ring on sequence=4), batch 3."""
  prompt, lengths = ar.pad_prompts([[1, 2, 3, 4, 5], [7, 8], [3, 3, 3, 1]])
  config = ar.ARConfig(max_new_tokens=8, sampling=SamplingParams(temperature=0.0))
  sample = lambda model: ar.sample(model, params, prompt, lengths, jax.random.key(0), config)
  dense_model, ring_model = CausalLM(MODEL), CausalLM(dataclasses.replace(MODEL, attention="ring"))
  expected = sample(dense_model)
  positions = jnp.broadcast_to(jnp.arange(5), prompt.shape)
  cache = dense_model.init_cache(3, 13)
  want_logits, want_cache = jax.jit(dense_model.apply)(params, prompt, positions, cache)
  with rules.activate(make_mesh(data=2, sequence=4)):
    logits, filled = jax.jit(ring_model.prefill)(params, prompt, positions, cache)
    actual = sample(ring_model)
  np.testing.assert_allclose(logits, want_logits, atol=MODEL_TOL)
  for got, want in zip(filled.keys, want_cache.keys):
    np.testing.assert_allclose(got, want, atol=MODEL_TOL)
  np.testing.assert_array_equal(filled.lengths, want_cache.lengths)
  np.testing.assert_array_equal(actual.tokens, expected.tokens)


@pytest.mark.slow
def test_draft_free_decoders_on_a_sequence_parallel_prefilled_target_equal_dense_ar(params):
  """Prompt lookup and lookahead read the ring-prefilled cache like AR does (batch 3)."""
  prompt, lengths = ar.pad_prompts([[1, 2, 3, 4, 5], [7, 8], [3, 3, 3, 1]])
  greedy = SamplingParams(temperature=0.0)
  expected = ar.sample(CausalLM(MODEL), params, prompt, lengths, jax.random.key(0),
                       ar.ARConfig(max_new_tokens=8, sampling=greedy))
  ring_model = CausalLM(dataclasses.replace(MODEL, attention="ring"))
  configs = [(prompt_lookup.sample, prompt_lookup.PromptLookupConfig(3, 8, sampling=greedy)),
             (lookahead.sample, lookahead.LookaheadConfig(window=2, ngram=3, candidates=2,
                                                          max_new_tokens=8, sampling=greedy))]
  with rules.activate(make_mesh(data=2, sequence=4)):
    for sample, config in configs:
      out = sample(ring_model, params, prompt, lengths, jax.random.key(0), config)
      np.testing.assert_array_equal(out.tokens, expected.tokens)


@pytest.mark.slow
def test_eagle_on_a_sequence_parallel_prefilled_target_equals_dense(params):
  """The EAGLE head reads the features of the ring-prefilled prompt (batch 3), drafting a chain
  or a dynamic tree: the same tokens as on the dense target, and as greedy AR."""
  prompt, lengths = ar.pad_prompts([[1, 2, 3, 4, 5], [7, 8], [3, 3, 3, 1]])
  greedy = SamplingParams(temperature=0.0)
  with_head = dataclasses.replace(MODEL, draft_heads=DraftHeadsConfig(eagle=True))
  dense, ring = EagleLM(with_head), EagleLM(dataclasses.replace(with_head, attention="ring"))
  head_params = {**random_params(dense), **params}  # the target's weights, a random head
  greedy_ar = ar.sample(CausalLM(MODEL), params, prompt, lengths, jax.random.key(0),
                       ar.ARConfig(max_new_tokens=8, sampling=greedy)).tokens
  for tree_nodes in (0, 5):  # the chain, and EAGLE-2's dynamic tree
    config = eagle.EagleConfig(num_draft_tokens=3, max_new_tokens=8, sampling=greedy,
                               tree_nodes=tree_nodes)
    expected = eagle.sample(dense, head_params, prompt, lengths, jax.random.key(0), config)
    with rules.activate(make_mesh(data=2, sequence=4)):
      out = eagle.sample(ring, head_params, prompt, lengths, jax.random.key(0), config)
    np.testing.assert_array_equal(out.tokens, expected.tokens)
    np.testing.assert_array_equal(expected.tokens, greedy_ar)

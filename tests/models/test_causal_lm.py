"""CausalLM surface: params and their logical axes, tied/untied head, bf16 compute, jit-ability."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.causal_lm import CausalLM
from models.config import ModelConfig

VOCABULARY = {"vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "norm"}


def _tokens(seed, shape, vocab):
  return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape), jnp.int32)


@pytest.mark.parametrize("tie", [True, False])
def test_every_param_has_logical_axes(small_config, tie):
  model = CausalLM(dataclasses.replace(small_config, tie_embeddings=tie))
  boxed = jax.eval_shape(model.module.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
  params = boxed["params"]
  leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
  for spec, leaf in zip(jax.tree.leaves(nn.get_partition_spec(params)), leaves):
    assert len(spec) == leaf.value.ndim and set(spec) <= VOCABULARY, spec
  assert ("head" in params) == (not tie)
  if not tie:
    head = nn.get_partition_spec(params)["head"]["kernel"]
    assert head == jax.sharding.PartitionSpec("embed", "vocab")


def test_boxed_and_unboxed_params_give_the_same_logits(small_config, build, full_logits):
  model, params = build(small_config)
  tokens = _tokens(0, (2, 5), model.vocab_size)
  abstract = jax.eval_shape(model.module.init, jax.random.key(0), tokens)["params"]
  boxed = jax.tree.map(lambda box, value: box.replace_boxed(value), abstract, params,
                       is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  from_boxed = jax.jit(model.module.apply)({"params": boxed}, tokens)
  unboxed = full_logits(model, params, tokens)
  assert unboxed.shape == (2, 5, model.vocab_size) and unboxed.dtype == jnp.float32
  np.testing.assert_array_equal(from_boxed, unboxed)


def test_init_draws_float32_normals_with_scaled_residual_projections():
  config = ModelConfig(vocab_size=64, num_layers=2, d_model=64, num_heads=4, mlp_dim=128,
                       init_std=0.05)
  params = CausalLM(config).init(jax.random.key(0))
  assert all(isinstance(x, jax.Array) and x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  block = params["blocks_0"]
  np.testing.assert_array_equal(block["mlp_norm"]["scale"], np.ones(64))
  assert abs(float(jnp.std(params["embed"]["embedding"])) - 0.05) < 0.005
  assert abs(float(jnp.std(block["attention"]["query"]["kernel"])) - 0.05) < 0.005
  assert abs(float(jnp.std(block["mlp"]["down"]["kernel"])) - 0.05 / 2) < 0.0025  # 1/sqrt(2L)


def test_bfloat16_compute_is_close_to_float32(small_config, build, apply, full_logits):
  model32, params = build(small_config)
  model16 = CausalLM(dataclasses.replace(small_config, dtype="bfloat16"))
  tokens = _tokens(2, (2, 8), model32.vocab_size)
  ref = full_logits(model32, params, tokens)
  out = full_logits(model16, params, tokens)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, ref, atol=0.05 * float(jnp.abs(ref).max()))

  cache = model16.init_cache(2, 8)
  assert cache.keys[0].dtype == jnp.bfloat16 and cache.lengths.dtype == jnp.int32
  positions = jnp.broadcast_to(jnp.arange(8, dtype=jnp.int32), (2, 8))
  _, cache = apply(model16, params, tokens[:, :7], positions[:, :7], cache)
  last, _ = apply(model16, params, tokens[:, 7:], positions[:, 7:], cache)
  np.testing.assert_allclose(last[:, 0], out[:, 7], atol=0.02 * float(jnp.abs(ref).max()))


def test_model_is_a_hashable_static_argument(small_config):
  assert hash(CausalLM(small_config)) == hash(CausalLM(dataclasses.replace(small_config)))
  with pytest.raises(ValueError, match="num_kv_heads=3 must divide"):
    CausalLM(dataclasses.replace(small_config, num_kv_heads=3))


def test_init_cache_defaults_to_config_max_len():
  cache = CausalLM(ModelConfig(num_layers=3, num_kv_heads=2, max_len=20)).init_cache(4)
  assert len(cache.keys) == 3 and cache.keys[0].shape == (4, 2, 20, 16)
  np.testing.assert_array_equal(cache.lengths, np.zeros(4))

"""The logical axis annotations shard the model and its cache on a mesh without changing results."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models.causal_lm import CausalLM
from models.kv_cache import KVCache
from parallelism import rules
from parallelism.mesh import make_mesh


def test_sharded_cached_decode_matches_one_device(small_config, build):
  """8 host devices as data=2, fsdp=2, tensor=2: params, activations and KV cache sharded."""
  model, params = build(small_config)
  mesh = make_mesh(data=2, fsdp=2, tensor=2)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, model.vocab_size, (4, 8)), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(8, dtype=jnp.int32), tokens.shape)
  param_sharding = rules.logical_shardings(_boxed_params(model), mesh)
  cache_sharding = nn.logical_to_mesh_sharding(KVCache.logical_axes(small_config.num_layers),
                                               mesh, rules.LOGICAL_RULES)

  def run(params, tokens, positions, shard_cache=lambda cache: cache):
    cache = shard_cache(model.init_cache(tokens.shape[0], 12))
    _, cache = model.apply(params, tokens[:, :6], positions[:, :6], cache)
    return model.apply(params, tokens[:, 6:], positions[:, 6:], cache)

  expected = jax.jit(run)(params, tokens, positions)
  with jax.set_mesh(mesh), rules.axis_rules():
    sharded = jax.jit(
        lambda *args: run(*args, lambda c: jax.lax.with_sharding_constraint(c, cache_sharding)),
        in_shardings=(param_sharding, rules.batch_sharding(mesh), rules.batch_sharding(mesh)),
    )(jax.device_put(params, param_sharding), tokens, positions)
  np.testing.assert_allclose(sharded[0], expected[0], atol=1e-5)
  for buffer, spec in zip(sharded[1].keys, cache_sharding.keys):
    assert buffer.sharding.is_equivalent_to(spec, 4)
  np.testing.assert_array_equal(sharded[1].lengths, expected[1].lengths)


def test_sharded_packed_and_piggybacked_calls_match_one_device(small_config, build):
  """The serving engines' calls on the data=2, fsdp=2, tensor=2 mesh (params and cache sharded)
  equal one device's: a token-packed call (`apply_packed`, TETRIS's packed verify) and a decode
  step with piggybacked prompt chunks (`apply_step_with_chunks`), logits and cache alike."""
  model, params = build(small_config)
  mesh = make_mesh(data=2, fsdp=2, tensor=2)
  batch, rng = 4, np.random.default_rng(1)
  draw = lambda shape: jnp.asarray(rng.integers(0, model.vocab_size, shape), jnp.int32)
  prompt, new, step, chunk = draw((batch, 6)), draw((1, 8)), draw((batch,)), draw((2, 4))
  lengths = jnp.array([6, 3, 5, 4], jnp.int32)
  rows = jnp.array([0, 0, 2, 3, 3, 3, batch, -1], jnp.int32)  # the last two: padding
  offsets = jnp.array([0, 1, 0, 0, 1, 2, 0, 0], jnp.int32)
  param_sharding = rules.logical_shardings(_boxed_params(model), mesh)
  cache_sharding = nn.logical_to_mesh_sharding(KVCache.logical_axes(small_config.num_layers),
                                               mesh, rules.LOGICAL_RULES)

  def primed(params, shard):
    cache = shard(model.init_cache(batch, 16))
    positions = jnp.broadcast_to(jnp.arange(6, dtype=jnp.int32), prompt.shape)
    return model.apply(params, prompt, positions, cache)[1].replace(lengths=lengths)

  def packed(params, shard):
    positions = (lengths[jnp.clip(rows, 0, batch - 1)] + offsets)[None]
    return model.apply_packed(params, new, positions, rows, offsets, 3, primed(params, shard))

  def piggybacked(params, shard):
    chunk_positions = jnp.array([[3, 4, 5, 6], [0, 1, 2, 3]], jnp.int32)
    return model.apply_step_with_chunks(params, step, lengths, jnp.array([True, False, True, True]),
                                        chunk, chunk_positions, jnp.array([1, batch]),
                                        jnp.array([3, 0]), primed(params, shard))

  constrain = lambda cache: jax.lax.with_sharding_constraint(cache, cache_sharding)
  for call in (packed, piggybacked):
    expected = jax.jit(lambda p: call(p, lambda cache: cache))(params)
    with jax.set_mesh(mesh), rules.axis_rules():
      sharded = jax.jit(lambda p: call(p, constrain), in_shardings=(param_sharding,))(
          jax.device_put(params, param_sharding))
    jax.tree.map(lambda got, want: np.testing.assert_allclose(got, want, atol=1e-5), sharded,
                 expected)
    for buffer, spec in zip(sharded[-1].keys + sharded[-1].values,
                            cache_sharding.keys + cache_sharding.values):
      assert buffer.sharding.is_equivalent_to(spec, 4)  # the cache stayed sharded


def test_init_traces_under_set_mesh(small_config):
  """Multi-axis kernels initialised flat (as nn.DenseGeneral does) fail here; ours must not."""
  model = CausalLM(small_config)
  mesh = make_mesh(data=2, fsdp=2, tensor=2)
  sharding = rules.logical_shardings(_boxed_params(model), mesh)
  init = lambda key: nn.meta.unbox(model.module.init(key, jnp.zeros((1, 1), jnp.int32))["params"])
  with jax.set_mesh(mesh), rules.axis_rules():
    shapes = jax.eval_shape(jax.jit(init, out_shardings=sharding), jax.random.key(0))
  query = shapes["blocks_0"]["attention"]["query"]["kernel"]
  assert query.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)


def _boxed_params(model):
  tokens = jnp.zeros((1, 1), jnp.int32)
  return jax.eval_shape(model.module.init, jax.random.key(0), tokens)["params"]

"""The logical axis annotations shard the model on a mesh without changing its results."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models.kv_cache import KVCache
from parallelism import rules
from parallelism.mesh import make_mesh


def test_sharded_init_forward_and_decode_match_one_device(small_config, build):
  """8 host devices as data=2, fsdp=2, tensor=2: params, activations and cache all sharded,
  under `jax.set_mesh` (where multi-axis kernels of nn.DenseGeneral would fail to initialise)."""
  model, params = build(small_config)
  mesh = make_mesh(data=2, fsdp=2, tensor=2)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, model.vocab_size, (4, 8)), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(8, dtype=jnp.int32), tokens.shape)
  boxed = jax.eval_shape(model.module.init, jax.random.key(0), tokens[:1, :1])["params"]
  param_sharding = rules.logical_shardings(boxed, mesh)
  cache_sharding = nn.logical_to_mesh_sharding(KVCache.logical_axes(), mesh, rules.LOGICAL_RULES)

  def run(params, tokens, positions, shard_cache=lambda cache: cache):
    cache = shard_cache(model.init_cache(tokens.shape[0], 12))
    _, cache = model.apply(params, tokens[:, :6], positions[:, :6], cache)
    decoded, cache = model.apply(params, tokens[:, 6:], positions[:, 6:], cache)
    return model.logits(params, tokens), decoded, cache

  expected = jax.jit(run)(params, tokens, positions)
  with jax.set_mesh(mesh), rules.axis_rules():
    init = lambda key: nn.meta.unbox(model.module.init(key, tokens[:1, :1])["params"])
    sharded_params = jax.jit(init, out_shardings=param_sharding)(jax.random.key(0))
    sharded = jax.jit(
        lambda *args: run(*args, lambda c: jax.lax.with_sharding_constraint(c, cache_sharding)),
        in_shardings=(param_sharding, rules.batch_sharding(mesh), rules.batch_sharding(mesh)),
    )(sharded_params, tokens, positions)
  jax.tree.map(np.testing.assert_array_equal, sharded_params, params)
  query = sharded_params["blocks_0"]["attention"]["query"]["kernel"]
  assert query.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
  np.testing.assert_allclose(sharded[0], expected[0], atol=1e-5)
  np.testing.assert_allclose(sharded[1], expected[1], atol=1e-5)
  assert sharded[2].keys.sharding.is_equivalent_to(cache_sharding.keys, 5)
  np.testing.assert_array_equal(sharded[2].lengths, expected[2].lengths)

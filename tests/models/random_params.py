"""Test parameters drawn with numpy, shaped like `CausalLM.init`'s.

XLA:CPU takes a large fraction of a second to compile each threefry draw, so a jitted
`CausalLM.init` costs seconds per config; tests that only need some random weights use this.
"""

import jax
import jax.numpy as jnp
import numpy as np


def random_params(model, seed: int = 0) -> dict:
  """Unboxed float32 params: RMSNorm scales 1, every other weight normal(0, config.init_std)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(model.init, jax.random.key(0))  # traces only, compiles nothing

  def draw(path, leaf):
    if path[-1].key == "scale":
      return jnp.ones(leaf.shape, leaf.dtype)
    return jnp.asarray(rng.normal(0.0, model.config.init_std, leaf.shape), leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)

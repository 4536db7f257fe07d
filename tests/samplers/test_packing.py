"""Token packing: rows' first tokens laid end to end, and the call's outputs laid back."""

import jax.numpy as jnp
import numpy as np

from samplers.core import packing


def test_pack_gather_and_scatter_round_trip_ragged_rows():
  dense = jnp.arange(12).reshape(3, 4) + 1  # [B, W]: row b's tokens 4b + 1 ..
  packed = packing.pack(jnp.asarray([2, 0, 3]), size=7, width=4)
  np.testing.assert_array_equal(packed.rows, [0, 0, 2, 2, 2, 3, 3])  # 3 (= B): padding
  np.testing.assert_array_equal(packed.offsets[:5], [0, 1, 0, 1, 2])
  np.testing.assert_array_equal(packed.gather(dense)[:5], [1, 2, 9, 10, 11])
  back = packed.scatter(10 * packed.gather(dense), width=4)
  np.testing.assert_array_equal(back, [[10, 20, 0, 0], [0, 0, 0, 0], [90, 100, 110, 0]])
  trailing = packed.scatter(jnp.ones((7, 2)), width=4)  # trailing axes follow
  assert trailing.shape == (3, 4, 2) and float(trailing.sum()) == 10.0

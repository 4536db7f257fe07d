"""The named mesh: axis sizes, -1 filling, Auto axis types, clear errors."""

import jax
import pytest
from jax.sharding import AxisType

from parallelism.mesh import AXES, make_mesh, resolve_axis_sizes


def test_minus_one_fills_the_remaining_devices():
  assert resolve_axis_sizes((-1, 2, 1, 2), 8) == (2, 2, 1, 2)
  mesh = make_mesh(data=-1, tensor=4)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "sequence": 1, "tensor": 4}
  assert mesh.axis_names == AXES
  assert all(t == AxisType.Auto for t in mesh.axis_types)


@pytest.mark.parametrize("sizes, message", [
    ((3, 1, 1, 2), "has 6 devices but 8 are available"),
    ((-1, 3, 1, 1), "the fixed axes multiply to 3, which does not divide the 8"),
    ((-1, -1, 1, 1), "at most one axis may be -1"),
    ((0, 1, 1, 8), "must be positive or -1"),
])
def test_mismatches_show_device_count_and_product(sizes, message):
  with pytest.raises(ValueError, match=message):
    resolve_axis_sizes(sizes, 8)


def test_dcn_factor_must_divide_the_axis_and_match_the_processes():
  with pytest.raises(ValueError, match="dcn_data=3 must be positive and divide mesh.data=8"):
    make_mesh(data=8, dcn=(3, 1, 1, 1))
  with pytest.raises(ValueError, match="need 2 processes of 4 devices each"):
    make_mesh(data=8, dcn=(2, 1, 1, 1))  # one process here
  assert jax.process_count() == 1

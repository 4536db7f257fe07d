"""A named device mesh over ('data', 'fsdp', 'sequence', 'tensor').

Axis types are `Auto`: with jax >= 0.8 `jax.make_mesh` defaults to Explicit axes, under which
linen's logical sharding constraints fail; Auto lets the compiler propagate shardings from them.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

AXES = ("data", "fsdp", "sequence", "tensor")


def resolve_axis_sizes(sizes: Sequence[int], device_count: int) -> tuple[int, ...]:
  """Replaces a single -1 by the devices left over; raises ValueError when the product mismatches."""
  sizes = tuple(int(s) for s in sizes)
  shown = ", ".join(f"{a}={s}" for a, s in zip(AXES, sizes))
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh ({shown}): at most one axis may be -1")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh ({shown}): axis sizes must be positive or -1")
  fixed = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if device_count % fixed:
      raise ValueError(
          f"mesh ({shown}): the fixed axes multiply to {fixed}, which does not divide the "
          f"{device_count} available devices")
    sizes = tuple(device_count // fixed if s == -1 else s for s in sizes)
  if math.prod(sizes) != device_count:
    raise ValueError(
        f"mesh ({shown}) has {math.prod(sizes)} devices but {device_count} are available; "
        f"make the product of the axis sizes equal {device_count} (or set one axis to -1)")
  return sizes


def make_mesh(data: int = -1, fsdp: int = 1, sequence: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None,
              dcn: Sequence[int] = (1, 1, 1, 1)) -> Mesh:
  """The mesh over all (or the given) devices with Auto axis types.

  `dcn` gives, per axis, how many of its entries lie across slices (multi-slice TPU, connected by
  the data-centre network) rather than within one; it must divide the axis size. Without slice
  information on the devices (GPU/CPU hosts) each process counts as one slice.
  """
  devices = list(devices) if devices is not None else jax.devices()
  shape = resolve_axis_sizes((data, fsdp, sequence, tensor), len(devices))
  types = (AxisType.Auto,) * len(AXES)
  dcn = tuple(int(d) for d in dcn)
  if dcn == (1,) * len(AXES):
    return jax.make_mesh(shape, AXES, axis_types=types, devices=devices)
  for axis, size, outer in zip(AXES, shape, dcn):
    if outer < 1 or size % outer:
      raise ValueError(f"mesh.dcn_{axis}={outer} must be positive and divide mesh.{axis}={size}")
  inner = tuple(size // outer for size, outer in zip(shape, dcn))
  by_process = devices[0].platform != "tpu"  # only TPU devices carry real slice indices
  try:
    grid = mesh_utils.create_hybrid_device_mesh(inner, dcn, devices, process_is_granule=by_process)
  except ValueError as e:
    granules = "processes" if by_process else "slices"
    raise ValueError(f"mesh dcn factors {dict(zip(AXES, dcn))} need {math.prod(dcn)} {granules} "
                     f"of {math.prod(inner)} devices each: {e}") from None
  return Mesh(grid, AXES, axis_types=types)

"""Logical axis rules: what an array axis means -> where it lives on the mesh.

Models annotate parameters and activations with logical names (`batch`, `length`, `embed`,
`heads`, ...); this one table maps them onto the mesh axes. A mesh axis is used at most once per
array (flax skips a rule whose mesh axis is already taken, so activations shard `batch` over
('data', 'fsdp') and leave `embed` whole, while parameters shard `embed` over 'fsdp').
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", "sequence"),
    ("cache_length", None),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("embed", "fsdp"),
    ("head_dim", None),
    ("norm", None),
)


def logical_shardings(boxed_tree: Any, mesh: Mesh, rules=LOGICAL_RULES) -> Any:
  """NamedShardings for a pytree whose leaves may be `nn.LogicallyPartitioned` boxes.

  Unannotated leaves are replicated. Empty pytree nodes (e.g. optax's `MaskedNode` for frozen
  parameters) stay empty, so the result has the tree's own structure.
  """
  specs = nn.get_partition_spec(boxed_tree)
  return jax.tree.map(lambda spec: nn.logical_to_mesh_sharding(spec, mesh, rules), specs,
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


def check_divisible(boxed_tree: Any, mesh: Mesh, rules=LOGICAL_RULES) -> None:
  """Raises ValueError naming the first array dimension its mesh axes do not divide.

  The message gives the parameter path, the logical axis name, the dimension and the axis size,
  instead of the compiler's error deep inside `jax.jit`.
  """
  logical = nn.get_partition_spec(boxed_tree)
  shardings = nn.logical_to_mesh_sharding(logical, mesh, rules)
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)
  plain = jax.tree.map(lambda x: x.unbox(apply_constraint=False) if is_box(x) else x, boxed_tree,
                       is_leaf=is_box)
  leaves = jax.tree_util.tree_leaves_with_path(plain)
  for (path, leaf), names, sharding in zip(leaves, jax.tree.leaves(logical, is_leaf=_is_spec),
                                           jax.tree.leaves(shardings)):
    for dim, (size, axes) in enumerate(zip(leaf.shape, sharding.spec)):
      axes = (axes,) if isinstance(axes, str) else (axes or ())
      count = 1
      for axis in axes:
        count *= mesh.shape[axis]
      if size % count:
        where = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
        raise ValueError(
            f"{where} dimension {dim} ({names[dim]}) has size {size}, not divisible by the mesh "
            f"axes {'x'.join(axes)} = {count}; change the mesh or the model size")


def _is_spec(x: Any) -> bool:
  return isinstance(x, PartitionSpec)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Sharding of a [batch, ...] array: batch over ('data', 'fsdp'), the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def axis_rules(rules=LOGICAL_RULES):
  """Context manager that activates the rules for `nn.with_logical_constraint` inside models."""
  return nn.logical_axis_rules(rules)


@contextlib.contextmanager
def activate(mesh: Mesh, rules=LOGICAL_RULES) -> Iterator[None]:
  """The mesh (`jax.set_mesh`) and the logical rules, for tracing and running sharded code."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def spec_of(sharding: jax.sharding.Sharding) -> list:
  """A JSON-friendly PartitionSpec (list of axis names / lists / None)."""
  spec = getattr(sharding, "spec", PartitionSpec())
  return [list(a) if isinstance(a, tuple) else a for a in spec]

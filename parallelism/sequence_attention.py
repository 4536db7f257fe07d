"""Sequence-parallel self-attention over the 'sequence' mesh axis, selected by name.

Every variant computes what `models.attention.attend` computes for a cache-free call (GQA, scale
D**-0.5, float32 scores and softmax, output in q's dtype), on globally shaped arrays whose length
axis is sharded over 'sequence' (batch over ('data', 'fsdp'), heads over 'tensor'), through
`jax.shard_map` over the context mesh (`parallelism.rules.activate`). With n = sequence size:

| variant     | communication per call               | per-device memory (per head)       |
|-------------|--------------------------------------|------------------------------------|
| `ring`      | n-1 K/V block shifts (`ppermute`)    | O(T/n) rows + block^2 scores       |
| `allgather` | all-gather of K/V                    | K/V of length T, [T/n, T] scores   |
| `ulysses`   | 4 all-to-alls (q, k, v, output)      | [T, T] scores for H/n heads        |

`ring` (`parallelism.ring_attention`) is the long-context choice: a causal ring uses the
zig-zag layout (`parallelism.zigzag`, applied and undone inside the call, so callers keep the
natural order) and a recomputing backward. `allgather` is simplest and fine while T/n * T
scores fit. `ulysses` needs heads divisible by sequence x tensor and suits many heads with
moderate T. Without a mesh, or with a 'sequence' axis of size 1, every variant is plain dense
attention.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from parallelism import local_attention
from parallelism.allgather_attention import allgather_attention
from parallelism.ring_attention import ring_attention
from parallelism.ulysses_attention import ulysses_attention

VARIANTS = ("ring", "allgather", "ulysses")
SEQUENCE, TENSOR, BATCH = "sequence", "tensor", ("data", "fsdp")
DEFAULT_BLOCK = 512


def _axis_size(mesh, name: str) -> int:
  return dict(mesh.shape).get(name, 1)


def length_multiple(kind: str, causal: bool = True) -> int:
  """The sequence length must be a multiple of this on the context mesh (1 without a mesh)."""
  size = _axis_size(jax.sharding.get_abstract_mesh(), SEQUENCE)
  if size == 1:
    return 1
  return 2 * size if kind == "ring" and causal else size


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, kind: str, causal: bool = True,
              block: int = DEFAULT_BLOCK) -> jax.Array:
  """Self-attention with the named sequence-parallel variant.

  Args:
    q: [B, T, H, D] rotated queries.
    k, v: [B, T, KVH, D] rotated keys and values; KVH divides H.
    kind: one of VARIANTS.
    causal: query i sees keys j <= i; otherwise every key.
    block: tile edge of ring attention's blockwise per-step computation.
  Returns:
    [B, T, H, D] in q's dtype.
  Raises:
    ValueError: unknown kind, or a length/head count the variant cannot split on this mesh.
  """
  if kind not in VARIANTS:
    raise ValueError(f"sequence attention {kind!r} is unknown; valid: {', '.join(VARIANTS)}")
  mesh = jax.sharding.get_abstract_mesh()
  size, tensor = _axis_size(mesh, SEQUENCE), _axis_size(mesh, TENSOR)
  if size == 1:
    steps = q.shape[1]
    mask = jnp.tril(jnp.ones((steps, steps), bool)) if causal else None
    return local_attention.dense(q, k, v, mask)
  _check(kind, causal, q.shape, k.shape, size, tensor)
  # KV heads that 'tensor' does not divide are repeated (each still serves its query heads);
  # a batch that ('data', 'fsdp') does not divide is replicated over them (redundant, correct).
  repeats = local_attention.kv_repeats(k.shape[2], q.shape[2], tensor)
  k, v = (jnp.repeat(x, repeats, axis=2) for x in (k, v))
  batch_axes = tuple(a for a in BATCH if _axis_size(mesh, a) > 1)
  shard_batch = batch_axes and q.shape[0] % math.prod(_axis_size(mesh, a) for a in batch_axes) == 0
  spec = PartitionSpec(batch_axes if shard_batch else None, SEQUENCE,
                       TENSOR if tensor > 1 else None, None)
  local = {
      "ring": functools.partial(ring_attention, causal=causal, axis=SEQUENCE, size=size,
                                block=block),
      "allgather": functools.partial(allgather_attention, causal=causal, axis=SEQUENCE),
      "ulysses": functools.partial(ulysses_attention, causal=causal, axis=SEQUENCE, size=size),
  }[kind]
  return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec)(q, k, v)


def _check(kind: str, causal: bool, q_shape, kv_shape, size: int, tensor: int) -> None:
  """Raises ValueError naming the quantity, its value and the axis sizes it must fit."""
  steps, heads, kv_heads = q_shape[1], q_shape[2], kv_shape[2]
  if heads % kv_heads:
    raise ValueError(f"{kind} attention: num_kv_heads={kv_heads} must divide num_heads={heads}")
  if kind == "ring" and causal and steps % (2 * size):
    raise ValueError(
        f"ring attention (causal, zig-zag layout) needs the sequence length divisible by 2 x "
        f"the 'sequence' axis size: length={steps}, 2 x sequence = {2 * size}")
  if steps % size:
    raise ValueError(f"{kind} attention needs the sequence length divisible by the 'sequence' "
                     f"axis size: length={steps}, sequence={size}")
  if heads % tensor:
    raise ValueError(f"{kind} attention needs num_heads divisible by the 'tensor' axis size: "
                     f"num_heads={heads}, tensor={tensor}")
  if kind == "ulysses" and heads % (size * tensor):
    raise ValueError(
        f"ulysses attention needs num_heads divisible by the 'sequence' x 'tensor' axis sizes: "
        f"num_heads={heads}, sequence={size} x tensor={tensor} = {size * tensor}")

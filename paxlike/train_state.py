"""What a run's checkpoint holds: the train state, and its shapes and shardings on a mesh.

`state_layout(exp)` builds the experiment's mesh, model and optimizer and the abstract
`TrainState` with the shardings the logical axis rules give it. The trainer builds its state with
it and `paxlike.run.Run` reads checkpoints back with it, so both agree on what is stored where.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from models.build import build_model
from parallelism import rules
from parallelism.mesh import make_mesh
from paxlike.config import Experiment
from paxlike.errors import UserError
from paxlike.optim import make_optimizer


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs besides the data position."""

  step: jax.Array  # [] int32
  params: Any
  opt_state: Any
  rng: jax.Array  # [2] uint32 raw key; folded with the step for any per-step randomness



@dataclasses.dataclass(frozen=True)
class StateLayout:
  """An experiment's mesh, model and optimizer, and the shapes and shardings of its TrainState
  (what a checkpoint holds): the trainer builds its state with it, `paxlike.run.Run` reads
  checkpoints back with it."""

  mesh: Mesh
  model: Any
  tx: optax.GradientTransformation
  abstract_state: TrainState  # jax.ShapeDtypeStruct leaves that carry their shardings
  state_shardings: TrainState


def boxed_init(model: Any, tx: optax.GradientTransformation, seq_len: int,
               key: jax.Array) -> TrainState:
  """A fresh TrainState from `key`, its parameters still boxed with their logical axis names."""
  params = model.module.init(key, jnp.zeros((1, seq_len), jnp.int32))["params"]
  return TrainState(step=jnp.zeros([], jnp.int32), params=params, opt_state=tx.init(params),
                    rng=jax.random.key_data(jax.random.fold_in(key, 1)))


def state_layout(exp: Experiment) -> StateLayout:
  """The layout of `exp` on `exp.mesh`; UserError for a mesh the devices do not fit, a bad model
  config, or a batch, sequence or sharded parameter dimension the mesh does not divide."""
  try:
    m = exp.mesh
    mesh = make_mesh(m.data, m.fsdp, m.sequence, m.tensor,
                     dcn=(m.dcn_data, m.dcn_fsdp, m.dcn_sequence, m.dcn_tensor))
  except ValueError as e:
    raise UserError(str(e)) from None
  try:
    model = dataclasses.replace(build_model(exp.model), remat=exp.train.remat)
  except ValueError as e:
    raise UserError(str(e)) from None
  tx = make_optimizer(exp.optimizer, exp.schedule, exp.train.steps, exp.train.trainable)
  with rules.activate(mesh):
    boxed = jax.eval_shape(functools.partial(boxed_init, model, tx, exp.data.seq_len),
                           jax.random.key(exp.train.seed))
    _check_divisible(exp, mesh, boxed)
    state_shardings = rules.logical_shardings(boxed, mesh)
  abstract_state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.meta.unbox(boxed),
      state_shardings)
  return StateLayout(mesh, model, tx, abstract_state, state_shardings)


_MODEL_FIELDS = {"heads": "model.num_heads", "kv_heads": "model.num_kv_heads",
                 "mlp": "model.mlp_dim", "vocab": "model.vocab_size", "embed": "model.d_model"}


def _check_divisible(exp: Experiment, mesh: Mesh, boxed: TrainState) -> None:
  """Every sharded dimension, the batch and the sequence divide by their mesh axes."""
  shape = mesh.shape
  batch_shards = shape["data"] * shape["fsdp"]
  if exp.train.batch_size % batch_shards:
    raise UserError(f"train.batch_size={exp.train.batch_size} is not divisible by "
                    f"mesh.data x mesh.fsdp = {batch_shards}")
  micro = exp.train.microbatches
  if exp.train.batch_size % (micro * batch_shards):
    raise UserError(f"train.batch_size={exp.train.batch_size} does not split into "
                    f"train.microbatches={micro} microbatches of a multiple of mesh.data x "
                    f"mesh.fsdp = {batch_shards} rows; make batch_size a multiple of "
                    f"{micro * batch_shards}")
  if exp.data.seq_len % shape["sequence"]:
    raise UserError(f"data.seq_len={exp.data.seq_len} is not divisible by "
                    f"mesh.sequence={shape['sequence']}")
  try:
    rules.check_divisible(boxed.params, mesh)
  except ValueError as e:
    hint = next((f" ({field}={getattr(exp.model, field.split('.')[1])})"
                 for name, field in _MODEL_FIELDS.items() if f"({name})" in str(e)), "")
    raise UserError(f"{e}{hint}") from None

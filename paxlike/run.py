"""A run handle: what one workdir holds, read back for whoever needs a trained model.

A workdir holds `config.json` (the resolved experiment, written before training starts) and
Orbax checkpoints of the train state. `Run(workdir)` reads and writes that config, refuses a
restart whose training-relevant fields (`config.TRAINING_IDENTITY`) differ from it, and restores
the (model, params) of the latest readable checkpoint, placed with the trainer's shardings on a
mesh. A run of an imported model (`model.init_from`: a Hugging Face Llama directory) that has no
checkpoint yet restores that directory's weights instead, at step 0.

  run = Run("runs/tiny")
  model, params, step = run.restore(config.MeshConfig())  # on all devices, the data axis
  run.exp.model                                            # the stored config.json

Why a module of its own: using a trained run needs its config and its parameters, not an
optimizer loop, training data or a distillation teacher. One reader serves the CLI modes, the
distillation teacher, `train.init_from`, the data writers and the benchmarks, and one check
guards the main run and its companion models alike; `Trainer` only trains. The shapes and
shardings of a checkpoint come from `paxlike.train_state.state_layout`, so what is read back is
exactly what the trainer wrote.

Reading and checking a config stays cheap for the CLI: the checkpointer (Orbax, Grain), the
Hugging Face reader and `paxlike.train` (which itself uses this module) are imported on first use.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax

from models.config import ModelConfig
from paxlike import atomic, train_state
from paxlike import config as config_lib
from paxlike.config import Experiment, MeshConfig
from paxlike.errors import UserError
from paxlike.train_state import StateLayout

CONFIG = "config.json"
CHECKPOINTS = "checkpoints"


class Restored(NamedTuple):
  """A restored run: its model (see `models.build`), parameters (device arrays) and step."""

  model: Any
  params: Any
  step: int


class Run:
  """The run in `workdir`: its config.json and its checkpoints.

  Attributes:
    workdir: the run's directory.
    config_path: workdir/config.json.
    log: where checkpoint warnings (a corrupt one set aside) and the Hugging Face import go.
  """

  def __init__(self, workdir: Path | str, exp: Experiment | None = None,
               log: Callable[[str], None] = print):
    """exp: the experiment to restore as (e.g. the stored one with --set overrides, or a fresh
    one with model.init_from and no workdir yet); default: the stored config.json."""
    self.workdir = Path(workdir)
    self.config_path = self.workdir / CONFIG
    self.log = log
    self._exp = exp
    self._layouts: dict[MeshConfig, StateLayout] = {}

  # ------------------------------------------------------------------ config.json

  def stored_config(self) -> Experiment | None:
    """config.json as an Experiment; None without one, UserError if it is not a valid config."""
    if not self.config_path.exists():
      return None
    try:
      return config_lib.from_dict(Experiment, json.loads(self.config_path.read_text()))
    except (json.JSONDecodeError, TypeError) as e:
      raise UserError(f"{self.config_path} is not a valid paxlike config ({e})") from None

  @property
  def exp(self) -> Experiment:
    """The experiment given to the constructor, else config.json (UserError without one)."""
    if self._exp is None:
      stored = self.stored_config()
      if stored is None:
        raise UserError(f"{str(self.workdir)!r} has no trained run (no config.json)")
      self._exp = stored
    return self._exp

  def write_config(self, exp: Experiment) -> None:
    """Writes `exp` as config.json, atomically, from process 0 (every process runs this)."""
    if jax.process_index() == 0:
      atomic.write_text(self.config_path, config_lib.to_json(exp) + "\n")

  def config_changes(self, new: Experiment) -> list[str]:
    """Lines `  key: stored -> new` for the TRAINING_IDENTITY fields where `new` differs from
    config.json; none without a stored config."""
    stored = self.stored_config()
    if stored is None:
      return []
    return config_lib.diff(stored, new, config_lib.TRAINING_IDENTITY)

  def check_unchanged(self, new: Experiment, allow_change: bool = False,
                      companion: str = "") -> None:
    """Refuses to continue this run as `new` if that changes what was trained (UserError listing
    the changes), unless `allow_change` (run.allow_config_change). companion: the name of a
    model trained alongside the main run (e.g. "companion draft"), for its message."""
    changes = self.config_changes(new)
    if not changes or allow_change:
      return
    if companion:
      raise UserError(f"the {companion} in {str(self.workdir)!r} was trained differently:\n"
                      + "\n".join(changes) + "\nuse a new --workdir")
    raise UserError(
        f"workdir {str(self.workdir)!r} holds a run with a different configuration:\n"
        + "\n".join(changes)
        + "\nuse a new --workdir, or pass --set run.allow_config_change=true to continue anyway")

  # ------------------------------------------------------------------ checkpoints

  def layout(self, mesh: MeshConfig | None = None) -> StateLayout:
    """The model and the train state's shapes and shardings of this run on `mesh` (default:
    exp.mesh); UserError if the mesh does not fit the devices or divide the model."""
    mesh = self.exp.mesh if mesh is None else mesh
    if mesh not in self._layouts:
      self._layouts[mesh] = train_state.state_layout(dataclasses.replace(self.exp, mesh=mesh))
    return self._layouts[mesh]

  def restore(self, mesh: MeshConfig | None = None) -> Restored:
    """The model and the parameters of the latest readable checkpoint, and its step, placed on
    `mesh` (default: exp.mesh) as the trainer shards them. A checkpoint that cannot be read is
    set aside and the one before it used (see `Checkpointer`). Without a checkpoint: the weights
    of model.init_from at step 0 if that is set, else a UserError."""
    from paxlike.checkpointing import Checkpointer
    exp, layout = self.exp, self.layout(mesh)
    restored = None
    if (self.workdir / CHECKPOINTS).is_dir():
      checkpointer = Checkpointer(self.workdir, exp.checkpoint, log=self.log)
      try:
        restored = checkpointer.restore_latest(layout.abstract_state, None)
      finally:
        checkpointer.close()
    if restored is None and exp.model.init_from:
      return Restored(layout.model, hf_params(exp.model, layout, self.log), 0)
    if restored is None:
      raise UserError(f"workdir {str(self.workdir)!r} has no checkpoint; train it first "
                      "with --mode=train")
    state, step = restored
    return Restored(layout.model, state.params, step)


def hf_params(model: ModelConfig, layout: StateLayout, log: Callable[[str], None] = print) -> Any:
  """The weights of `model.init_from` (a Hugging Face Llama directory, `paxlike.interchange`)
  as this layout's parameters, placed with its shardings; UserError if the layout's model has
  parameters a plain Llama lacks."""
  from paxlike import interchange
  source = model.init_from
  host = interchange.read_params(source, model)
  if jax.tree.structure(host) != jax.tree.structure(layout.abstract_state.params):
    raise UserError(f"model.init_from={source!r} holds a plain Llama, but this model has other "
                    "parameters (model.kind, ParScale or an acceptance head); use a plain "
                    "model.kind=llama")
  log(f"initialised the model from {source}")
  return jax.tree.map(jax.device_put, host, layout.state_shardings.params)

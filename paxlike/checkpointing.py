"""Orbax checkpoints of the train state and the Grain iterator, with safe fallback on corruption.

Saves are asynchronous (the arrays are copied to host before `save` returns, so the next donated
train step cannot race them) and atomic: Orbax writes into a temporary directory and renames it
when complete, so a process killed mid-save leaves the previous checkpoints intact and the
temporary directory is cleaned up on the next start. A checkpoint that exists but cannot be read
is moved aside (never deleted) and the previous one is used instead.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import grain
import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from paxlike.config import CheckpointConfig
from paxlike.errors import UserError


def quiet_orbax_logging() -> None:
  """Keeps Orbax's (and absl's) INFO chatter off the default output."""
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)
  for name in ("orbax", "orbax.checkpoint", "absl", "jax._src.distributed"):
    logging.getLogger(name).setLevel(logging.WARNING)


class Checkpointer:
  """Keep-last-K checkpoint manager over items `state` (a pytree) and `data` (Grain iterator)."""

  def __init__(self, workdir: Path, cfg: CheckpointConfig, log: Callable[[str], None] = print):
    self.directory = (Path(workdir) / "checkpoints").absolute()
    self.quarantine = (Path(workdir) / "checkpoints_unreadable").absolute()
    self._cfg = cfg
    self._log = log
    self._manager = self._open()

  def _open(self) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=self._cfg.keep,
        enable_async_checkpointing=self._cfg.async_save,
        cleanup_tmp_directories=True,
        create=True,
    )
    handlers = {"state": ocp.StandardCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler()}
    return ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_iterator: grain.DatasetIterator | None) -> None:
    """Starts an (async) save of `state` and the iterator position at `step`."""
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    self._manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore_latest(self, abstract_state: Any,
                     data_iterator: grain.DatasetIterator | None) -> tuple[Any, int] | None:
    """Restores the newest readable checkpoint into the given shapes/shardings, or None if none.

    An unreadable checkpoint is moved to `checkpoints_unreadable/` and the next older one is tried.
    """
    while (step := self.latest_step()) is not None:
      self._check_fits(step, abstract_state)
      items = {"state": ocp.args.StandardRestore(abstract_state)}
      if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
      except Exception as e:  # noqa: BLE001 - any failure to read means "unusable checkpoint"
        self._set_aside(step, e)
        continue
      return restored["state"], step
    return None

  def _check_fits(self, step: int, abstract_state: Any) -> None:
    """Refuses (touching nothing) a readable checkpoint whose parameter shapes differ from ours."""
    try:
      saved = _param_shapes(self._manager.item_metadata(step)["state"])
    except Exception:  # noqa: BLE001 - unreadable metadata: the restore will set it aside
      return
    expected = _param_shapes(abstract_state)
    if not saved or saved == expected:
      return
    wrong = [f"{p}: saved {saved.get(p)}, model expects {expected.get(p)}"
             for p in sorted(set(saved) | set(expected)) if saved.get(p) != expected.get(p)]
    raise UserError(
        f"the checkpoint at step {step} in {self.directory} was saved by a model of another shape "
        f"({len(wrong)} parameters differ; first: {wrong[0]}); use a new --workdir, or train with "
        "the model config the checkpoint was made with (see config.json)")

  def _set_aside(self, step: int, error: Exception) -> None:
    target = self.quarantine / f"{step}-{int(time.time())}"
    if jax.process_index() == 0:
      self.quarantine.mkdir(parents=True, exist_ok=True)
      shutil.move(str(self.directory / str(step)), str(target))
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"paxlike_set_aside_{step}")
    reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
    self._manager.close()
    self._manager = self._open()
    older = self.latest_step()
    fallback = f"falling back to step {older}" if older is not None else "no older checkpoint; starting fresh"
    self._log(f"warning: checkpoint at step {step} is corrupt or partial ({reason}); "
              f"moved it to {target}; {fallback}")

  def close(self) -> None:
    """Waits for pending saves to commit, then releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()


def _param_shapes(state: Any) -> dict[str, tuple[int, ...]]:
  """'params/a/b' -> shape for every parameter leaf of a state or its checkpoint metadata."""
  params = state["params"] if hasattr(state, "keys") else getattr(state, "params", None)
  if params is None:
    return {}
  shapes = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    name = "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)
    shapes[name] = tuple(leaf.shape)
  return shapes

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
import orbax.checkpoint as ocp

from paxlike.config import CheckpointConfig


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
    return ocp.CheckpointManager(self.directory, options=options)

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

  def _set_aside(self, step: int, error: Exception) -> None:
    self.quarantine.mkdir(parents=True, exist_ok=True)
    target = self.quarantine / f"{step}-{int(time.time())}"
    shutil.move(str(self.directory / str(step)), str(target))
    reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
    self._manager.close()
    self._manager = self._open()
    older = self.latest_step()
    fallback = f"falling back to step {older}" if older is not None else "no older checkpoint; starting fresh"
    self._log(f"warning: checkpoint at step {step} is corrupt or partial ({reason}); "
              f"moved it to {target}; {fallback}")

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves to commit, then releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()

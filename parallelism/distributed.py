"""Multi-process start-up: `jax.distributed` from explicit flags or a detected TPU pod."""

from __future__ import annotations

import os

import jax


def _on_tpu_pod() -> bool:
  """Cloud TPU VMs with several hosts set TPU_WORKER_HOSTNAMES (comma-separated)."""
  return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def maybe_initialize(coordinator_address: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> bool:
  """Initialises jax.distributed when launched as several processes; returns whether it did.

  With explicit flags (all three) the given coordinator is used; on a TPU pod jax discovers
  everything itself. On CPU, collectives between processes go over gloo.
  """
  explicit = coordinator_address is not None
  if not explicit and not _on_tpu_pod():
    return False
  if explicit:
    if num_processes is None or process_id is None:
      raise ValueError("--coordinator_address needs --num_processes and --process_id as well")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  else:
    jax.distributed.initialize()
  return True

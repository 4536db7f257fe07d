"""Test set-up, before jax is imported anywhere: 8 simulated host CPU devices, and one persistent
XLA compilation cache per test run.

The cache is a fresh directory per run, shared by the pytest-xdist workers and by the CLI
subprocesses the tests start (they inherit the environment): the suite compiles the same
programs many times over (the same tiny models' init, train and decode steps in many files, the
same CLI job in many subprocesses), and on a 2-core machine compiling is most of its time. A run
starts cold, as on a fresh clone; the directory is removed at the end.
"""

import os
import shutil
import tempfile

import pytest

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

_CACHE_VARIABLE = "PAXLIKE_TEST_COMPILE_CACHE"
if _CACHE_VARIABLE not in os.environ:  # the controller (or a run without workers) makes it
  os.environ[_CACHE_VARIABLE] = tempfile.mkdtemp(prefix="paxlike-test-xla-")
  _OWN_CACHE = True
else:
  _OWN_CACHE = False
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ[_CACHE_VARIABLE])
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def pytest_unconfigure(config):
  del config
  if _OWN_CACHE:
    shutil.rmtree(os.environ[_CACHE_VARIABLE], ignore_errors=True)


@pytest.fixture
def quick_compiles(monkeypatch):
  """XLA with most optimizations off (`jax_disable_most_optimizations`: LLVM -O0, no expensive
  passes) for this test and the `tests.paxlike.cli` processes it starts. For tests whose time is
  compiling many programs of tiny models (random initialisers and samplers take seconds each at
  -O2): compiles take about half as long and run the same computation, so every check stands."""
  import jax
  monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)

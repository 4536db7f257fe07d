"""Test set-up, before jax is imported anywhere: 8 simulated host CPU devices, XLA flags that
compile faster (`tests/xla.py`), one persistent XLA compilation cache per test run, and XLA's
optimizations only where they pay.

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

from tests import xla  # flags only; imports no jax

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla.flags(8)).strip()
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
# Most XLA optimizations off (LLVM -O0, no expensive passes), here and in the CLI processes the
# tests start: the same computations, compiled in about half the time, and most tests run tiny
# programs a few times. Tests marked `optimised` turn them back on.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")


def pytest_unconfigure(config):
  del config
  if _OWN_CACHE:
    shutil.rmtree(os.environ[_CACHE_VARIABLE], ignore_errors=True)


@pytest.fixture(autouse=True)
def _optimised_when_marked(request):
  """XLA's optimizations for the tests marked `optimised` and the processes they start: those
  whose time is running programs rather than compiling them (statistical oracles over 10^5 rows,
  the Hugging Face round trip); off for the others (measured: the bench smoke tests and the
  acceptance-head training are 30-50% slower optimised, the oracles twice as fast)."""
  if request.node.get_closest_marker("optimised") is None:
    yield
    return
  import jax
  monkeypatch = request.getfixturevalue("monkeypatch")
  monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "0")
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", False)
  try:
    yield
  finally:
    jax.config.update("jax_disable_most_optimizations", previous)


def pytest_collection_modifyitems(config, items):
  """The longest files first, estimated as ten per slow test plus one per test (stable
  otherwise): pytest-xdist hands out whole files in this order, and a long file handed out last
  would leave the other worker idle at the end."""
  del config
  weight = {}
  for item in items:
    slow = item.get_closest_marker("slow") is not None
    weight[item.path] = weight.get(item.path, 0) + (10 if slow else 1)
  items.sort(key=lambda item: -weight[item.path])

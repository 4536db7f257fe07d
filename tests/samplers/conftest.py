"""Fixtures shared by the sampler tests; the slow tests here run optimised."""

from pathlib import Path

import jax
import pytest

_HERE = Path(__file__).parent


def pytest_collection_modifyitems(config, items):
  """The slow sampler tests are the statistical oracles: one small program over 10^5 rows, whose
  run time XLA's optimizations cut by more than they add to its compile (marked `optimised`)."""
  del config
  for item in items:
    if item.get_closest_marker("slow") and _HERE in item.path.parents:
      item.add_marker(pytest.mark.optimised)


@pytest.fixture
def fresh_trace(monkeypatch):
  """A monkeypatch whose patches reach jitted samplers: compiled caches cleared around the test."""
  jax.clear_caches()
  yield monkeypatch
  monkeypatch.undo()
  jax.clear_caches()

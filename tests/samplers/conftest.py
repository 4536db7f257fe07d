"""Fixtures shared by the sampler tests."""

import jax
import pytest


@pytest.fixture
def fresh_trace(monkeypatch):
  """A monkeypatch whose patches reach jitted samplers: compiled caches cleared around the test."""
  jax.clear_caches()
  yield monkeypatch
  monkeypatch.undo()
  jax.clear_caches()

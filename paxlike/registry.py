"""The experiment registry: `@register` functions that return an `Experiment`, looked up by name.

Experiments live in the `configs` package (and in any module named by `--experiments`); they are
imported by name at start-up so that `paxlike` itself never depends on them.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Callable

from paxlike.config import Experiment
from paxlike.errors import UserError

_REGISTRY: dict[str, Callable[[], Experiment]] = {}

DEFAULT_MODULES = ("configs",)


def register(fn: Callable[[], Experiment]) -> Callable[[], Experiment]:
  """Registers `fn` under its own name; the experiment's `name` field is set to that name."""
  name = fn.__name__
  if name in _REGISTRY and _REGISTRY[name] is not fn:
    raise ValueError(f"experiment {name!r} is registered twice")
  _REGISTRY[name] = fn
  return fn


def load_modules(modules: tuple[str, ...] = DEFAULT_MODULES) -> None:
  """Imports the modules that register experiments."""
  for module in modules:
    try:
      importlib.import_module(module)
    except ModuleNotFoundError as e:
      raise UserError(f"cannot import experiments module {module!r}: {e}") from None


def names() -> list[str]:
  return sorted(_REGISTRY)


def get(name: str) -> Experiment:
  """The registered experiment `name`; unknown names list the registered ones."""
  if name not in _REGISTRY:
    raise UserError(f"unknown experiment {name!r}; registered experiments: {', '.join(names())}")
  return dataclasses.replace(_REGISTRY[name](), name=name)

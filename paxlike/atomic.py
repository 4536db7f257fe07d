"""Crash-safe file writes: a reader (or a restarted run) sees the old file or the new one, never
a partly written one, because the text goes to a temporary sibling that then replaces the file."""

from __future__ import annotations

import os
from pathlib import Path


def write_text(path: Path, text: str) -> None:
  """Writes `text` (UTF-8) to `path` atomically."""
  path = Path(path)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text, encoding="utf-8")
  os.replace(tmp, path)

"""The one exception type for bad user input.

Anything raised as `UserError` is printed by the CLI as a single `error: ...` line (no traceback)
with a non-zero exit code. The message must name what is wrong and what would be right.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(Exception):
  """Bad input from the user: config, corpus, prompt, mesh, workdir or checkpoint."""


def run_cli(job: Callable[[], str]) -> int:
  """Runs a command-line job: prints the summary line it returns (exit 0), or a UserError as one
  `error: ...` line on stderr (exit 2)."""
  try:
    summary = job()
  except UserError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 2
  print(summary, flush=True)
  return 0

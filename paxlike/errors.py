"""The one exception type for bad user input.

Anything raised as `UserError` is printed by the CLI as a single `error: ...` line (no traceback)
with a non-zero exit code. The message must name what is wrong and what would be right.
"""


class UserError(Exception):
  """Bad input from the user: config, corpus, prompt, mesh, workdir or checkpoint."""

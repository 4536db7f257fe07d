"""Registered experiments, one small module per family. Importing this package registers them."""

from configs import lm, pair  # noqa: F401

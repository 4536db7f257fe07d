"""Registered experiments, one small module per family. Importing this package registers them."""

from configs import diffusion, lm, pair, parscale, tasks  # noqa: F401

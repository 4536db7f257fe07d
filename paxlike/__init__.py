"""paxlike: a JAX research framework for parallel decoding of language models."""

__version__ = "0.1.0"

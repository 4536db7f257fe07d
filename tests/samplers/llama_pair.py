"""A small Llama target and a one-layer draft for greedy-equality tests of drafted decoders.

The draft is the target's embedding, first block and head; the target's second block is damped
(its output projections scaled by 0.3) so that the draft's argmax agrees often but not always,
which gives mixed acceptance lengths. Parameters are numpy-drawn (`random_params`).
"""

import jax
import jax.numpy as jnp
import numpy as np

from models.causal_lm import CausalLM
from models.config import ModelConfig
from tests.models.random_params import random_params

_SHAPE = dict(vocab_size=32, d_model=32, num_heads=4, num_kv_heads=2, mlp_dim=64, max_len=40,
              init_std=0.5, tie_embeddings=False)
TARGET = CausalLM(ModelConfig(num_layers=2, **_SHAPE))
DRAFT = CausalLM(ModelConfig(num_layers=1, **_SHAPE))


def params() -> tuple[dict, dict]:
  """(target params, draft params)."""
  target = random_params(TARGET)
  block = jax.tree.map(lambda x: x, target["blocks_1"])  # a copy to damp
  block["attention"]["out"]["kernel"] = 0.3 * block["attention"]["out"]["kernel"]
  block["mlp"]["down"]["kernel"] = 0.3 * block["mlp"]["down"]["kernel"]
  target = {**target, "blocks_1": block}
  return target, {name: value for name, value in target.items() if name != "blocks_1"}


def near_ties(target_params, prompts, expected, got) -> int:
  """Checks decoded tokens `got` [B, N] against greedy AR's `expected` [B, N]: a row may differ
  only from a near-tie on (target top-two logits within 1e-4), where the
  continuations part. Returns the number of such rows."""
  expected, got = np.asarray(expected), np.asarray(got)
  ties = 0
  for row in np.flatnonzero(np.any(got != expected, axis=1)):
    t = int(np.argmax(got[row] != expected[row]))
    context = list(prompts[row]) + list(expected[row, :t])
    logits = np.asarray(TARGET.logits(target_params, jnp.asarray([context])))[0, -1]
    best, runner_up = np.sort(logits)[::-1][:2]
    assert best - runner_up < 1e-4, (row, t, best - runner_up)
    ties += 1
  return ties

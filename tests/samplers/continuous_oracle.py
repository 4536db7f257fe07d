"""The exact-joint oracle for continuous batches: every slot prefilled with one of a few
prompts (ROWS slots each), a cycle of programs run until every request ends, and each prompt's
continuations tested against `prefix_toy.exact_joint`."""

import jax
import jax.numpy as jnp
import numpy as np

from samplers.core.logits import SamplingParams
from tests.samplers import prefix_toy
from tests.samplers.oracle import distribution, windows_p_value


def cycle_until_done(programs, slots):
  """Runs programs[i % len(programs)] (slots -> slots) for i = 0, 1, ... while a slot is active
  (one compiled loop)."""
  def call(state):
    i, s = state
    return i + 1, jax.lax.switch(i % len(programs), programs, s)

  return jax.lax.while_loop(lambda state: jnp.any(state[1].active), call, (0, slots))[1]


def joint_p_values(tokens, prompts, target_params, steps: int) -> list[float]:
  """One p-value per prompt: its rows of `tokens` [len(prompts) x rows, steps] (prompt-major)
  against the target's exact joint at T = 1 (`windows_p_value`)."""
  tokens = np.asarray(tokens).reshape(len(prompts), -1, steps)
  dist = distribution(SamplingParams(temperature=1.0))
  return [windows_p_value(rows, prefix_toy.exact_joint(target_params, p, steps, dist))
          for rows, p in zip(tokens, prompts)]

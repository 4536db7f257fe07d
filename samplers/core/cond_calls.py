"""Counting the model calls that a `lax.cond` skips, honestly also under `jax.vmap`.

A sampler that skips a model call nothing needs (`lax.cond(pred, call, reuse, ...)`) saves it only
while `pred` is one value for the whole program. Under `jax.vmap` with a batched predicate (a
per-sample flag: vmapping over keys, as `samplers.repeated` does, makes every such decision per
sample) `lax.cond` becomes a select that runs both branches for every sample, so the call runs
at every step whatever `pred` says. `branch_ran(pred)` is whether the `pred` branch ran: `pred`
itself, or True wherever a vmap batches `pred`, at any level of nested vmaps, exactly when
`lax.cond` turns into a select. Counting calls with it keeps a sampler's `model_calls` the calls
that ran, in a lone run and vmapped alike.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.custom_batching import custom_vmap


@custom_vmap
def branch_ran(pred: jax.Array) -> jax.Array:
  """[] bool: whether `lax.cond(pred, branch, other, ...)` runs `branch` (see the module)."""
  return jnp.asarray(pred, bool)


@branch_ran.def_vmap
def _branch_ran_vmap(axis_size, in_batched, pred):
  del axis_size
  if in_batched[0]:  # lax.cond's batching rule makes a select: both branches run
    return jnp.bool_(True), False
  return branch_ran(pred), False  # still a cond here; an enclosing vmap may batch it

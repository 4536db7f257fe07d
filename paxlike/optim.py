"""Optimizer and learning-rate schedules (optax)."""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import optax

from paxlike.config import OptimizerConfig, ScheduleConfig


def learning_rate_schedule(opt: OptimizerConfig, sched: ScheduleConfig,
                           total_steps: int) -> optax.Schedule:
  """Linear warmup followed by cosine decay, warmup-stable-decay, or a constant rate."""
  peak = opt.learning_rate
  floor = peak * sched.min_lr_ratio
  warmup = max(0, min(sched.warmup_steps, total_steps))
  if sched.kind == "cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=floor)
  warm = optax.linear_schedule(0.0, peak, max(warmup, 1))
  if sched.kind == "constant":
    return optax.join_schedules([warm, optax.constant_schedule(peak)], [warmup])
  if sched.kind == "wsd":
    decay_steps = max(1, int(total_steps * sched.decay_fraction))
    stable_end = max(warmup, total_steps - decay_steps)
    return optax.join_schedules(
        [warm, optax.constant_schedule(peak), optax.linear_schedule(peak, floor, decay_steps)],
        [warmup, stable_end])
  raise ValueError(f"unknown schedule.kind {sched.kind!r}")


def _decay_mask(params):
  """Weight decay on matrices only (not on norm scales)."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def param_path(path) -> str:
  """'/'-joined names of a pytree key path, e.g. 'layer_0/attention/query/kernel'."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def trainable_labels(params, pattern: str):
  """'train' / 'freeze' per parameter: trained when `pattern` (re.search) matches its path."""
  regex = re.compile(pattern)
  return jax.tree_util.tree_map_with_path(
      lambda path, _: "train" if regex.search(param_path(path)) else "freeze", params,
      is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))  # one label per (boxed) parameter


def make_optimizer(opt: OptimizerConfig, sched: ScheduleConfig, total_steps: int,
                   trainable: str = "") -> optax.GradientTransformation:
  """AdamW with global-norm clipping and the configured schedule.

  With `trainable` (a regex over parameter paths) only the matching parameters are updated;
  the others get zero updates and no optimizer state beyond optax's empty one.
  """
  adamw = optax.chain(
      optax.clip_by_global_norm(opt.clip_norm),
      optax.adamw(learning_rate_schedule(opt, sched, total_steps), b1=opt.b1, b2=opt.b2,
                  eps=opt.eps, weight_decay=opt.weight_decay, mask=_decay_mask),
  )
  if not trainable:
    return adamw
  return optax.multi_transform({"train": adamw, "freeze": optax.set_to_zero()},
                               lambda params: trainable_labels(params, trainable))

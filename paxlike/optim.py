"""Optimizer and learning-rate schedules (optax)."""

from __future__ import annotations

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


def make_optimizer(opt: OptimizerConfig, sched: ScheduleConfig,
                   total_steps: int) -> optax.GradientTransformation:
  """AdamW with global-norm clipping and the configured schedule."""
  return optax.chain(
      optax.clip_by_global_norm(opt.clip_norm),
      optax.adamw(learning_rate_schedule(opt, sched, total_steps), b1=opt.b1, b2=opt.b2,
                  eps=opt.eps, weight_decay=opt.weight_decay, mask=_decay_mask),
  )

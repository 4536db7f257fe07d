"""A target/draft pair for speculative decoding, trained on tinyshakespeare.

The draft is much narrower than the target and is distilled from it (KL to the target's
distributions), which is what raises acceptance; `python -m paxlike.bench decode` trains both
(draft with train.teacher_workdir set to the target's run) and caches them, and the draft's
acceptance head (`pair_draft_head`) for adaptive draft lengths.
"""

from __future__ import annotations

import dataclasses

from configs.lm import SHARED_DATA
from models.config import ModelConfig
from paxlike.config import (CheckpointConfig, DataConfig, EvalConfig, Experiment, OptimizerConfig,
                            RunConfig, SamplerConfig, ScheduleConfig, TrainConfig)
from paxlike.registry import register

_DATA = DataConfig(path=str(SHARED_DATA / "tinyshakespeare.txt"), seq_len=128)


@register
def pair_target() -> Experiment:
  """A 4-layer d256 target (~3.2M parameters), a few minutes on 2 cores."""
  return Experiment(
      model=ModelConfig(num_layers=4, d_model=256, num_heads=8, num_kv_heads=4, mlp_dim=768,
                        max_len=512),
      data=_DATA,
      optimizer=OptimizerConfig(learning_rate=3e-3),
      schedule=ScheduleConfig(kind="cosine", warmup_steps=30),
      checkpoint=CheckpointConfig(every_steps=100, keep=2),
      train=TrainConfig(steps=300, batch_size=16),
      eval=EvalConfig(every_steps=100, batches=8),
      sampler=SamplerConfig(prompt="ROMEO:\n", temperature=0.0),
      run=RunConfig(log_every=20, sample_after_train=False),
  )


@register
def pair_draft() -> Experiment:
  """A 1-layer d64 draft; train it with --set train.teacher_workdir=<pair_target's run>."""
  return Experiment(
      model=ModelConfig(num_layers=1, d_model=64, num_heads=4, num_kv_heads=4, mlp_dim=192,
                        max_len=512),
      data=_DATA,
      optimizer=OptimizerConfig(learning_rate=5e-3),
      schedule=ScheduleConfig(kind="cosine", warmup_steps=10),
      checkpoint=CheckpointConfig(every_steps=150, keep=1),
      train=TrainConfig(steps=150, batch_size=16),
      eval=EvalConfig(every_steps=0, batches=8),
      run=RunConfig(log_every=25, sample_after_train=False),
  )


@register
def pair_draft_head() -> Experiment:
  """pair_draft with a SpecDec++ acceptance head for `sampler.adaptive_rule=head`. The draft's
  weights are copied from train.init_from (pair_draft's run; default runs/pair_draft) and frozen,
  only the head learns, against the target in train.teacher_workdir (default runs/pair_target),
  with labels 1 - TV(target, draft)."""
  draft = pair_draft()
  return dataclasses.replace(
      draft,
      model=dataclasses.replace(draft.model, acceptance_head=True),
      optimizer=OptimizerConfig(learning_rate=3e-3, weight_decay=0.0),
      schedule=ScheduleConfig(kind="cosine", warmup_steps=10),
      checkpoint=CheckpointConfig(every_steps=100, keep=1),
      train=TrainConfig(steps=100, batch_size=16, init_from="runs/pair_draft",
                        teacher_workdir="runs/pair_target", trainable="acceptance_head"),
  )

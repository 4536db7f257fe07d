"""A target/draft pair for speculative decoding, trained on tinyshakespeare.

The draft is much narrower than the target and is distilled from it (KL to the target's
distributions), which is what raises acceptance; `python -m paxlike.bench decode` trains both
(draft with train.teacher_workdir set to the target's run) and caches them, and the draft's
acceptance head (`pair_draft_head`) for adaptive draft lengths.
"""

from __future__ import annotations

import dataclasses

from configs.lm import DATA_DIR
from models.config import DraftHeadsConfig, ModelConfig
from paxlike.config import (CheckpointConfig, DataConfig, EvalConfig, Experiment, OptimizerConfig,
                            RunConfig, SamplerConfig, ScheduleConfig, TrainConfig)
from paxlike.registry import register

_DATA = DataConfig(path=str(DATA_DIR / "tinyshakespeare.txt"), seq_len=128)


@register
def pair_target() -> Experiment:
  """A 6-layer d384 target (~9.5M parameters, 1000 steps: about 25 minutes on 2 cores). At batch 1
  its weights no longer fit the CPU's caches, so one token costs about 4 ms, 40x the draft's."""
  return Experiment(
      model=ModelConfig(num_layers=6, d_model=384, num_heads=6, num_kv_heads=2, mlp_dim=1024,
                        max_len=512),
      data=_DATA,
      optimizer=OptimizerConfig(learning_rate=2e-3),
      schedule=ScheduleConfig(kind="cosine", warmup_steps=50),
      checkpoint=CheckpointConfig(every_steps=100, keep=2),
      train=TrainConfig(steps=1000, batch_size=16),
      eval=EvalConfig(every_steps=100, batches=8),
      sampler=SamplerConfig(prompt="ROMEO:\n", temperature=0.0),
      run=RunConfig(log_every=20, sample_after_train=False),
  )


@register
def pair_draft() -> Experiment:
  """A 2-layer d128 draft (~0.4M parameters, ~2.5% of the target's cost per token; two layers
  can hold an induction head, which predicts the repetitions greedy decoding falls into). Train
  it with --set train.teacher_workdir=<pair_target's run>: 1200 steps of KL to the target's
  distributions, about 10 minutes on 2 cores (the target's forward pass dominates). For
  speculative decoding, distil it on the target's own continuations (`paxlike.teacher_text`;
  --set data.path=<that file>), as the decode bench does."""
  return Experiment(
      model=ModelConfig(num_layers=2, d_model=128, num_heads=4, num_kv_heads=4, mlp_dim=384,
                        max_len=512),
      data=_DATA,
      optimizer=OptimizerConfig(learning_rate=4e-3),
      schedule=ScheduleConfig(kind="cosine", warmup_steps=30),
      checkpoint=CheckpointConfig(every_steps=300, keep=1),
      train=TrainConfig(steps=1200, batch_size=16),
      eval=EvalConfig(every_steps=0, batches=8),
      run=RunConfig(log_every=25, sample_after_train=False),
  )


@register
def pair_draft_head() -> Experiment:
  """pair_draft with a SpecDec++ acceptance head for `sampler.kind=adaptive` with `sampler.rule=head`. The draft's
  weights are copied from train.init_from (pair_draft's run; default runs/pair_draft) and frozen,
  only the head learns, against the target in train.teacher_workdir (default runs/pair_target),
  with labels 1 - TV(target, draft)."""
  draft = pair_draft()
  return dataclasses.replace(
      draft,
      model=dataclasses.replace(draft.model, draft_heads=DraftHeadsConfig(acceptance=True)),
      optimizer=OptimizerConfig(learning_rate=3e-3, weight_decay=0.0),
      schedule=ScheduleConfig(kind="cosine", warmup_steps=10),
      checkpoint=CheckpointConfig(every_steps=100, keep=1),
      train=TrainConfig(steps=100, batch_size=16, init_from="runs/pair_draft",
                        teacher_workdir="runs/pair_target", trainable="acceptance_head"),
  )


@register
def pair_medusa() -> Experiment:
  """pair_target with 4 Medusa heads for `sampler.kind=medusa`. The target's weights are copied
  from train.init_from (pair_target's run; default runs/pair_target) and frozen; only the heads
  learn (Medusa-1). Train them on the target's own continuations (`paxlike.teacher_text`;
  --set data.path=<that file>), as the decode bench does: 300 steps, a few minutes on 2 cores
  (the frozen target's forward pass dominates)."""
  return _heads_on_target(DraftHeadsConfig(medusa=4), "medusa", steps=300)


@register
def pair_eagle() -> Experiment:
  """pair_target with an EAGLE draft head for `sampler.kind=eagle`. The target's weights are
  copied from train.init_from (pair_target's run; default runs/pair_target) and frozen; only the
  head learns (one decoder block over the target's features, its MLP 256 wide: on a CPU a head
  as wide as the target's blocks costs more per draft than its extra acceptance earns; a 3-step
  training-time test). Train it on the target's own continuations (`paxlike.teacher_text`;
  --set data.path=<that file>), as the decode bench does: 400 steps, about 8 minutes on 2 cores."""
  return _heads_on_target(DraftHeadsConfig(eagle=True, eagle_mlp_dim=256, eagle_rollout=3),
                          "eagle", steps=400)


def _heads_on_target(heads: DraftHeadsConfig, trainable: str, steps: int) -> Experiment:
  """pair_target carrying `heads`, which train alone (`train.trainable`) for `steps` steps on
  the target's weights from train.init_from (default runs/pair_target)."""
  target = pair_target()
  return dataclasses.replace(
      target,
      model=dataclasses.replace(target.model, draft_heads=heads),
      optimizer=OptimizerConfig(learning_rate=3e-3, weight_decay=0.0),
      schedule=ScheduleConfig(kind="cosine", warmup_steps=20),
      checkpoint=CheckpointConfig(every_steps=steps, keep=1),
      train=TrainConfig(steps=steps, batch_size=16, init_from="runs/pair_target",
                        trainable=trainable),
      eval=EvalConfig(every_steps=0, batches=8),
  )


@register
def pair_cllm() -> Experiment:
  """pair_target fine-tuned for Jacobi decoding (`sampler.kind=jacobi`, blocks of 8) by CLLM's
  consistency objective (`models.consistency`): the weights start from train.init_from and the
  frozen copy in train.teacher_workdir (both pair_target's run; default runs/pair_target) gives
  the Jacobi trajectories of each window's last 8 places. Train it on the target's own
  continuations (`paxlike.teacher_text`; --set data.path=<that file>), as the decode bench does:
  600 steps of 16 windows of 64 tokens, about 15 minutes on 2 cores."""
  target = pair_target()
  return dataclasses.replace(
      target,
      data=dataclasses.replace(target.data, seq_len=64),
      optimizer=OptimizerConfig(learning_rate=5e-4, weight_decay=0.0),
      schedule=ScheduleConfig(kind="cosine", warmup_steps=20),
      checkpoint=CheckpointConfig(every_steps=600, keep=1),
      train=TrainConfig(steps=600, batch_size=16, init_from="runs/pair_target",
                        teacher_workdir="runs/pair_target", consistency_block=8),
      eval=EvalConfig(every_steps=0, batches=8),
  )


@register
def pair_mdlm() -> Experiment:
  """A bidirectional masked-diffusion drafter for pair_target (`sampler.kind=diffusion_drafted`:
  one denoiser call drafts the next tokens from its marginals, the target verifies them exactly):
  the `mdlm_shakespeare` shape (4 x d128, ~0.8M parameters, windows of 128 tokens), trained on
  the target's own continuations like pair_draft (--set data.path=<pair_target's
  teacher_text.txt>, as the decode bench does): 1500 steps, a few minutes on 2 cores."""
  return Experiment(
      model=ModelConfig(kind="mdlm", num_layers=4, d_model=128, num_heads=4, num_kv_heads=4,
                        mlp_dim=384, max_len=128),
      data=_DATA,
      optimizer=OptimizerConfig(learning_rate=3e-3, weight_decay=0.0),
      schedule=ScheduleConfig(kind="cosine", warmup_steps=30),
      checkpoint=CheckpointConfig(every_steps=1500, keep=1),
      train=TrainConfig(steps=1500, batch_size=16),
      eval=EvalConfig(every_steps=0, batches=8),
      run=RunConfig(log_every=100, sample_after_train=False),
  )

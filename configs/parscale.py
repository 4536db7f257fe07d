"""ParScale experiments on tinyshakespeare (`models/parscale.py`; Chen et al. 2025).

`parscale_p1`, `parscale_p2` and `parscale_p4` are one small byte-level model trained from scratch
for the same steps on the same batches with P = 1, 2 and 4 parallel streams (P = 1 is the plain
model); compare their held-out `eval_loss` / `eval_bpb` in `WORKDIR/metrics.jsonl`.
`parscale_post` is the paper's light post-training: P = 2 streams initialised from a trained
`parscale_p1` run, with only the new prefixes and aggregator trained.
"""

from __future__ import annotations

import dataclasses

from configs.lm import DATA_DIR
from models.config import ModelConfig, ParScaleConfig
from paxlike.config import (CheckpointConfig, DataConfig, EvalConfig, Experiment, OptimizerConfig,
                            RunConfig, SamplerConfig, ScheduleConfig, TrainConfig)
from paxlike.registry import register

PREFIX_LEN = 8  # prefix slots per layer and stream (the paper uses 48 on 0.5-4.4B models)


def _streams(streams: int) -> Experiment:
  """A ~0.1M-parameter model, 300 steps of 16 x 128 bytes (P = 1: about a minute on 2 cores)."""
  return Experiment(
      model=ModelConfig(num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, mlp_dim=192,
                        max_len=256,
                        parscale=ParScaleConfig(streams=streams,
                                                prefix_len=PREFIX_LEN if streams > 1 else 0)),
      data=DataConfig(path=str(DATA_DIR / "tinyshakespeare.txt"), seq_len=128),
      optimizer=OptimizerConfig(learning_rate=3e-3),
      schedule=ScheduleConfig(kind="cosine", warmup_steps=20),
      checkpoint=CheckpointConfig(every_steps=100, keep=1),
      train=TrainConfig(steps=300, batch_size=16),
      eval=EvalConfig(every_steps=100, batches=16),
      sampler=SamplerConfig(prompt="ROMEO:\n", max_new_tokens=64, temperature=0.0),
      run=RunConfig(log_every=25, sample_after_train=False),
  )


@register
def parscale_p1() -> Experiment:
  """The base model (one stream, no prefix)."""
  return _streams(1)


@register
def parscale_p2() -> Experiment:
  """Two streams: same weights, own prefixes, learned aggregation; twice the compute per token."""
  return _streams(2)


@register
def parscale_p4() -> Experiment:
  """Four streams: four times the compute per token."""
  return _streams(4)


@register
def parscale_post() -> Experiment:
  """Light post-training: P = 2 from a trained `parscale_p1` run (its default workdir
  `runs/parscale_p1`, or `--set train.init_from=DIR`), training only the prefixes and the
  aggregator for 100 steps; the shared weights stay the base's."""
  exp = _streams(2)
  return dataclasses.replace(
      exp, schedule=ScheduleConfig(kind="cosine", warmup_steps=10),
      train=dataclasses.replace(exp.train, steps=100, init_from="runs/parscale_p1",
                                trainable="prefix|aggregator"),
      eval=dataclasses.replace(exp.eval, every_steps=50))

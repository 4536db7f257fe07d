"""Byte-level Llama-style language models: the main job, a tiny smoke model, tinyshakespeare."""

from __future__ import annotations

from pathlib import Path

from models.config import ModelConfig
from paxlike.config import (CheckpointConfig, DataConfig, EvalConfig, Experiment, MeshConfig,
                            OptimizerConfig, RunConfig, SamplerConfig, ScheduleConfig, TrainConfig)
from paxlike.registry import register

# Data shipped with the registered experiments: tinyshakespeare (public domain, 1.1 MB).
DATA_DIR = Path(__file__).resolve().parent / "data"


@register
def demo() -> Experiment:
  """The main job: a ~1.6M-parameter model on the default corpus, then a distilled draft, then
  greedy AR and speculative decoding side by side, then a small masked-diffusion model
  (`demo_diffusion`) and its parallel decoding; under 5 minutes on 2 cores."""
  return Experiment(
      model=ModelConfig(num_layers=4, d_model=192, num_heads=6, num_kv_heads=2, mlp_dim=512,
                        max_len=512),
      data=DataConfig(seq_len=128),
      optimizer=OptimizerConfig(learning_rate=3e-3),
      schedule=ScheduleConfig(kind="cosine", warmup_steps=30),
      checkpoint=CheckpointConfig(every_steps=100, keep=3),
      train=TrainConfig(steps=240, batch_size=16),
      eval=EvalConfig(every_steps=100, batches=8),
      sampler=SamplerConfig(prompt="def ", max_new_tokens=160, temperature=0.0,
                            kind="speculative", draft_experiment="demo_draft",
                            num_draft_tokens=4, diffusion_experiment="demo_diffusion"),
      run=RunConfig(log_every=10, sample_after_train=True),
  )


@register
def demo_draft() -> Experiment:
  """The main job's draft: one narrow layer, distilled from the demo model (its teacher)."""
  return Experiment(
      model=ModelConfig(num_layers=1, d_model=64, num_heads=4, num_kv_heads=4, mlp_dim=192,
                        max_len=512),
      data=DataConfig(seq_len=128),
      optimizer=OptimizerConfig(learning_rate=5e-3),
      schedule=ScheduleConfig(kind="cosine", warmup_steps=10),
      checkpoint=CheckpointConfig(every_steps=100, keep=1),
      train=TrainConfig(steps=200, batch_size=16),
      eval=EvalConfig(every_steps=0, batches=8),
      run=RunConfig(log_every=20, sample_after_train=False),
  )


@register
def tiny() -> Experiment:
  """Trains in seconds; shardable every way on 8 devices (batch 8, 4 heads / kv heads, seq 64)."""
  return Experiment(
      model=ModelConfig(num_layers=2, d_model=64, num_heads=4, num_kv_heads=4, mlp_dim=128,
                        max_len=128),
      data=DataConfig(path=str(DATA_DIR / "tinyshakespeare.txt"), seq_len=64),
      optimizer=OptimizerConfig(learning_rate=3e-3),
      schedule=ScheduleConfig(kind="cosine", warmup_steps=5),
      mesh=MeshConfig(data=-1),
      checkpoint=CheckpointConfig(every_steps=10, keep=3),
      train=TrainConfig(steps=30, batch_size=8),
      eval=EvalConfig(every_steps=0, batches=4),
      sampler=SamplerConfig(prompt="ROMEO:", max_new_tokens=32),
      run=RunConfig(log_every=1, sample_after_train=False),
  )


@register
def shakespeare() -> Experiment:
  """A ~1M-parameter character model of tinyshakespeare (a few minutes on 2 cores)."""
  return Experiment(
      model=ModelConfig(num_layers=4, d_model=128, num_heads=4, num_kv_heads=4, mlp_dim=384,
                        max_len=512),
      data=DataConfig(path=str(DATA_DIR / "tinyshakespeare.txt"), seq_len=128),
      schedule=ScheduleConfig(kind="wsd", warmup_steps=30),
      train=TrainConfig(steps=600, batch_size=16),
      eval=EvalConfig(every_steps=200, batches=8),
      sampler=SamplerConfig(prompt="ROMEO:\n", max_new_tokens=200, temperature=0.8),
  )


@register
def lm_11m() -> Experiment:
  """A 7-layer d384 model (~11M parameters) on tinyshakespeare at sequence length 256: the
  `bench train` model at the size where the train step's matmuls dominate its time."""
  return Experiment(
      model=ModelConfig(num_layers=7, d_model=384, num_heads=6, num_kv_heads=2, mlp_dim=1024,
                        max_len=512),
      data=DataConfig(path=str(DATA_DIR / "tinyshakespeare.txt"), seq_len=256),
      optimizer=OptimizerConfig(learning_rate=2e-3),
      schedule=ScheduleConfig(kind="cosine", warmup_steps=50),
      train=TrainConfig(steps=1000, batch_size=8),
      eval=EvalConfig(every_steps=200, batches=8),
      sampler=SamplerConfig(prompt="ROMEO:\n", max_new_tokens=200, temperature=0.8),
  )

"""Diffusion-style models: masked diffusion (MDLM, bidirectional and block-causal), any-subset AR
models (AS-ARM) and the Learn2PD finality head, on the default corpus and tinyshakespeare.

Their held-out loss is an ELBO (mdlm: an upper bound on the nll), an exact random-order nll
(asarm) or the finality head's cross-entropy per decision (learn2pd); see `models/`.
"""

from __future__ import annotations

import dataclasses

from configs.lm import DATA_DIR
from models.config import DiffusionConfig, FinalityConfig, ModelConfig
from paxlike.config import (CheckpointConfig, DataConfig, EvalConfig, Experiment, OptimizerConfig,
                            RunConfig, SamplerConfig, ScheduleConfig, TrainConfig)
from paxlike.registry import register

_SHAKESPEARE = DataConfig(path=str(DATA_DIR / "tinyshakespeare.txt"), seq_len=128)


def _experiment(kind: str, data: DataConfig, prompt: str, **model) -> Experiment:
  """The `shakespeare` recipe (~1M parameters, 600 steps of 16 x 128 tokens) for another kind."""
  return Experiment(
      model=ModelConfig(kind=kind, num_layers=4, d_model=128, num_heads=4, num_kv_heads=4,
                        mlp_dim=384, max_len=128, **model),
      data=data,
      schedule=ScheduleConfig(kind="wsd", warmup_steps=30),
      train=TrainConfig(steps=600, batch_size=16),
      eval=EvalConfig(every_steps=200, batches=8),
      sampler=SamplerConfig(prompt=prompt, max_new_tokens=96, temperature=0.0),
      run=RunConfig(sample_after_train=False),
  )


@register
def mdlm() -> Experiment:
  """Bidirectional masked diffusion LM on the default corpus (Python sources)."""
  return _experiment("mdlm", DataConfig(seq_len=128), "def ")


@register
def mdlm_shakespeare() -> Experiment:
  """Bidirectional masked diffusion LM on tinyshakespeare."""
  return _experiment("mdlm", _SHAKESPEARE, "ROMEO:\n")


@register
def mdlm_block_shakespeare() -> Experiment:
  """Block-causal masked diffusion (blocks of 16) on tinyshakespeare: exact block KV caching."""
  return _experiment("mdlm", _SHAKESPEARE, "ROMEO:\n", diffusion=DiffusionConfig(block_size=16))


@register
def asarm() -> Experiment:
  """Any-subset AR model on the default corpus."""
  return _experiment("asarm", DataConfig(seq_len=128), "def ")


@register
def asarm_shakespeare() -> Experiment:
  """Any-subset AR model on tinyshakespeare."""
  return _experiment("asarm", _SHAKESPEARE, "ROMEO:\n")


@register
def learn2pd_shakespeare() -> Experiment:
  """The Learn2PD finality head on a frozen `mdlm_shakespeare` denoiser (train that first into
  runs/mdlm_shakespeare, or point train.init_from at its workdir): only the head is trained."""
  base = mdlm_shakespeare()
  return dataclasses.replace(
      base,
      model=dataclasses.replace(base.model, kind="learn2pd",
                                finality=FinalityConfig(dim=64, steps=8)),
      data=dataclasses.replace(base.data, seq_len=64),
      optimizer=OptimizerConfig(learning_rate=3e-3, weight_decay=0.0),
      schedule=ScheduleConfig(kind="cosine", warmup_steps=10),
      train=TrainConfig(steps=150, batch_size=16, init_from="runs/mdlm_shakespeare",
                        trainable="^filter/"),
      eval=EvalConfig(every_steps=0, batches=4),
  )


@register
def demo_diffusion() -> Experiment:
  """The main job's companion: a small bidirectional MDLM on the default corpus that trains in
  about a minute on 2 cores; `demo` prints its parallel decoding beside AR and speculative."""
  return Experiment(
      model=ModelConfig(kind="mdlm", num_layers=2, d_model=128, num_heads=4, num_kv_heads=4,
                        mlp_dim=256, max_len=128),
      data=DataConfig(seq_len=128),
      optimizer=OptimizerConfig(learning_rate=3e-3),
      schedule=ScheduleConfig(kind="cosine", warmup_steps=20),
      checkpoint=CheckpointConfig(every_steps=100, keep=1),
      train=TrainConfig(steps=200, batch_size=16),
      eval=EvalConfig(every_steps=0, batches=4),
      sampler=SamplerConfig(prompt="def ", max_new_tokens=64, temperature=0.0),
      run=RunConfig(log_every=20, sample_after_train=False),
  )

"""A small causal LM of the verifiable task suite (`paxlike.tasks`), for test-time scaling.

`python -m paxlike.bench scaling` writes the corpus (`paxlike.bench.scaling_suite.CORPUS_*`: 60k
lines of all six tasks, seed 0) into its cache, trains `tasks_lm` on it and measures accuracy,
pass@k and selection rules for n = 1..64 samples per held-out prompt. To train it by hand:

  python -m paxlike.tasks --out runs/tasks_corpus.txt --lines 60000
  python -m paxlike.main --exp=tasks_lm --workdir=runs/tasks_lm
"""

from __future__ import annotations

from models.config import ModelConfig
from paxlike.config import (CheckpointConfig, DataConfig, EvalConfig, Experiment, OptimizerConfig,
                            RunConfig, SamplerConfig, ScheduleConfig, TrainConfig)
from paxlike.registry import register


@register
def tasks_lm() -> Experiment:
  """A 2-layer d128 byte model (~0.5M parameters) of task lines `tag input=answer`; a few
  minutes on 2 cores. data.path is the corpus file (the scaling bench sets it to its cache)."""
  return Experiment(
      model=ModelConfig(num_layers=2, d_model=128, num_heads=4, num_kv_heads=4, mlp_dim=384,
                        max_len=128),
      data=DataConfig(path="runs/tasks_corpus.txt", seq_len=96),
      optimizer=OptimizerConfig(learning_rate=3e-3, weight_decay=0.0),
      schedule=ScheduleConfig(kind="cosine", warmup_steps=30),
      checkpoint=CheckpointConfig(every_steps=100, keep=1),
      train=TrainConfig(steps=700, batch_size=32),
      eval=EvalConfig(every_steps=0, batches=4),
      sampler=SamplerConfig(prompt="add 12+34=", max_new_tokens=14, temperature=1.0),
      run=RunConfig(log_every=50, sample_after_train=False),
  )

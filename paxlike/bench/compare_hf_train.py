"""The train rows of `compare-hf`: paxlike's train step against PyTorch's on the same weights.

One float32 model (a `compare_hf_suite.TARGETS` shape) is drawn, exported with
`interchange.save_hf` and loaded by `transformers.LlamaForCausalLM`, so both systems start from
the same numbers. Each system takes the same optimizer step on the same batches of random tokens:

  paxlike  `paxlike.train.make_train_step` under `jax.jit` with the state donated: next-token
           cross-entropy, AdamW (decay on matrices), global-norm clipping
  torch    `LlamaForCausalLM` forward, the same cross-entropy, `backward()`,
           `clip_grad_norm_`, `torch.optim.AdamW` (decay on matrices), eager

Same learning rate (constant), betas, eps, weight decay and clip norm; the same CPU threads.
Both run `steps` steps, interleaved step by step, after `warmup` steps each (paxlike's first one
compiles). The rows report tokens/s (median over steps, with its range) and the loss of each step,
so the rows also show that both systems train the same model: `max_loss_diff` is the largest
difference between their losses over the same steps.
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from models.causal_lm import CausalLM
from models.config import ModelConfig
from paxlike import interchange
from paxlike.bench import harness
from paxlike.config import OptimizerConfig, ScheduleConfig
from paxlike.optim import learning_rate_schedule, make_optimizer
from paxlike.train import Trainer, make_train_step
from paxlike.train_state import TrainState

OPTIMIZER = OptimizerConfig(learning_rate=1e-3)
SCHEDULE = ScheduleConfig(kind="constant", warmup_steps=0)


def _paxlike_step(config: ModelConfig, params: Any):
  """(step(batch) -> loss, as a float once computed) for paxlike, state held inside."""
  model = CausalLM(config)
  tx = make_optimizer(OPTIMIZER, SCHEDULE, total_steps=1)
  schedule = learning_rate_schedule(OPTIMIZER, SCHEDULE, total_steps=1)
  step_fn = jax.jit(make_train_step(model, tx, schedule), donate_argnums=0)
  holder = {"state": TrainState(step=jnp.zeros([], jnp.int32), params=params,
                                opt_state=tx.init(params),
                                rng=jax.random.key_data(jax.random.key(0)))}

  def step(batch: np.ndarray) -> float:
    holder["state"], metrics = step_fn(holder["state"], jnp.asarray(batch))
    return float(metrics["loss"])

  return step


def _torch_step(torch, hf_model):
  """(step(batch) -> loss) for PyTorch: the same loss, clipping and AdamW as paxlike's."""
  decay = [p for p in hf_model.parameters() if p.ndim >= 2]
  no_decay = [p for p in hf_model.parameters() if p.ndim < 2]
  opt = torch.optim.AdamW([{"params": decay, "weight_decay": OPTIMIZER.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=OPTIMIZER.learning_rate, betas=(OPTIMIZER.b1, OPTIMIZER.b2),
                          eps=OPTIMIZER.eps)
  hf_model.train()

  def step(batch: np.ndarray) -> float:
    tokens = torch.as_tensor(batch, dtype=torch.long)
    logits = hf_model(input_ids=tokens[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                             tokens[:, 1:].reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(hf_model.parameters(), OPTIMIZER.clip_norm)
    opt.step()
    return float(loss.detach())

  return step


def measure(size: str, config: ModelConfig, batch: int, seq_len: int, steps: int, warmup: int,
            threads: int) -> list[dict[str, Any]]:
  """The two train rows (hf, paxlike) of one model shape."""
  import torch
  import transformers
  torch.set_num_threads(threads)
  config = dataclasses.replace(config, max_len=max(config.max_len, seq_len))
  params = jax.tree.map(np.asarray, CausalLM(config).init(jax.random.key(0)))
  with tempfile.TemporaryDirectory() as tmp:
    interchange.save_hf(tmp, config, params, token_ids={})
    hf_model = transformers.LlamaForCausalLM.from_pretrained(tmp, dtype=torch.float32)
  systems = {"hf": _torch_step(torch, hf_model),
             "paxlike": _paxlike_step(config, jax.tree.map(jnp.asarray, params))}
  rng = np.random.default_rng(0)
  batches = rng.integers(0, config.vocab_size, (warmup + steps, batch, seq_len + 1))
  losses = {name: [] for name in systems}
  times = {name: [] for name in systems}
  for index, tokens in enumerate(batches):
    for name, step in systems.items():
      start = time.perf_counter()
      losses[name].append(step(tokens))  # float(): waits for the step
      if index >= warmup:
        times[name].append(time.perf_counter() - start)
  count = Trainer.param_count(params)
  loss_diff = max(abs(a - b) for a, b in zip(losses["hf"], losses["paxlike"]))
  per_step = batch * seq_len
  rows = []
  for name in systems:
    median = statistics.median(times[name])
    rows.append(dict(target=size, params=count, system=name, method="train", batch=batch,
                     seq_len=seq_len, steps=steps,
                     tokens_per_s=round(per_step / median, 1),
                     tokens_per_s_range=[round(per_step / max(times[name]), 1),
                                         round(per_step / min(times[name]), 1)],
                     step_s=round(median, 4), final_loss=round(losses[name][-1], 4),
                     max_loss_diff=round(loss_diff, 5)))
  hf_rate = rows[0]["tokens_per_s"]
  rows[1].update(ratio_vs_hf=round(rows[1]["tokens_per_s"] / hf_rate, 2), vs_hf="hf train")
  return rows


def run_rows(sizes: tuple[str, ...], targets: dict[str, ModelConfig], batch: int, seq_len: int,
             steps: int, warmup: int, threads: int) -> list[dict[str, Any]]:
  """The train rows of every size, printed as they come."""
  rows = []
  for size in sizes:
    rows += measure(size, targets[size], batch, seq_len, steps, warmup, threads)
    harness.print_table(rows, ("target", "params", "system", "batch", "seq_len", "tokens_per_s",
                               "ratio_vs_hf", "final_loss", "max_loss_diff"))
  return rows

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

A third row, `matmuls only`, is the floor (`matmul_floor`): every matrix product of paxlike's
step (forward and backward; their FLOPs in `matmul_gflop`) run bare as one program, timed in a
second pass interleaved with PyTorch's step. Its `ratio_vs_hf` (PyTorch's step time in that pass
over the floor's) is about the most a system computing these products with this machine's
kernels could gain over PyTorch (an optimistic bound: `matmul_floor.bare_program`).
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
from paxlike.bench import harness, matmul_floor
from paxlike.config import OptimizerConfig, ScheduleConfig
from paxlike.optim import learning_rate_schedule, make_optimizer
from paxlike.train import Trainer, make_train_step
from paxlike.train_state import TrainState

OPTIMIZER = OptimizerConfig(learning_rate=1e-3)
SCHEDULE = ScheduleConfig(kind="constant", warmup_steps=0)
FLOOR = "matmuls only"  # the system name of the floor's row


def _paxlike_step(config: ModelConfig, params: Any, example: np.ndarray):
  """(step(batch) -> loss, as a float once computed) for paxlike, state held inside, and the
  matrix products of one step (`matmul_floor.step_dots`, traced on the `example` batch)."""
  model = CausalLM(config)
  tx = make_optimizer(OPTIMIZER, SCHEDULE, total_steps=1)
  schedule = learning_rate_schedule(OPTIMIZER, SCHEDULE, total_steps=1)
  train_step = make_train_step(model, tx, schedule)
  step_fn = jax.jit(train_step, donate_argnums=0)
  holder = {"state": TrainState(step=jnp.zeros([], jnp.int32), params=params,
                                opt_state=tx.init(params),
                                rng=jax.random.key_data(jax.random.key(0)))}
  dots = matmul_floor.step_dots(train_step, holder["state"], jnp.asarray(example))

  def step(batch: np.ndarray) -> float:
    holder["state"], metrics = step_fn(holder["state"], jnp.asarray(batch))
    return float(metrics["loss"])

  return step, dots


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
  """The train rows (hf, paxlike, the matmul floor) of one model shape."""
  import torch
  import transformers
  torch.set_num_threads(threads)
  config = dataclasses.replace(config, max_len=max(config.max_len, seq_len))
  params = jax.tree.map(np.asarray, CausalLM(config).init(jax.random.key(0)))
  with tempfile.TemporaryDirectory() as tmp:
    interchange.save_hf(tmp, config, params, token_ids={})
    hf_model = transformers.LlamaForCausalLM.from_pretrained(tmp, dtype=torch.float32)
  rng = np.random.default_rng(0)
  batches = rng.integers(0, config.vocab_size, (warmup + steps, batch, seq_len + 1))
  paxlike_step, dots = _paxlike_step(config, jax.tree.map(jnp.asarray, params), batches[0])
  systems = {"hf": _torch_step(torch, hf_model), "paxlike": paxlike_step}
  losses, times = _interleaved(systems, batches, warmup)
  # the floor in a second pass, beside PyTorch's step alone: timed beside paxlike's, it slowed
  # paxlike's step by 10-20% (cause not established) and would misstate that row
  bare = matmul_floor.bare_program(dots)
  bare()  # compiled before any timed pass, whatever `warmup`

  def floor(_) -> float:
    bare()
    return 0.0

  _, floor_times = _interleaved({"hf": systems["hf"], FLOOR: floor}, batches, warmup)
  loss_diff = max(abs(a - b) for a, b in zip(losses["hf"], losses["paxlike"]))
  base = dict(target=size, params=Trainer.param_count(params), method="train", batch=batch,
              seq_len=seq_len, steps=steps)
  rows = [_row(base, name, times[name], batch * seq_len, losses[name][-1], loss_diff)
          for name in systems]
  rows.append(_row(base, FLOOR, floor_times[FLOOR], batch * seq_len, None, None))
  rows[2]["matmul_gflop"] = float(f"{sum(d.flops for d in dots) / 1e9:.4g}")
  for row, hf_times, own in ((rows[1], times["hf"], times["paxlike"]),
                             (rows[2], floor_times["hf"], floor_times[FLOOR])):
    row.update(ratio_vs_hf=round(statistics.median(hf_times) / statistics.median(own), 2),
               vs_hf="hf train, interleaved with this row")
  return rows


def _interleaved(step_fns: dict[str, Any], batches: np.ndarray, warmup: int):
  """({name: loss of each step}, {name: seconds of each step after `warmup`}): every step
  function run on each batch in turn."""
  losses = {name: [] for name in step_fns}
  times = {name: [] for name in step_fns}
  for index, tokens in enumerate(batches):
    for name, step in step_fns.items():
      start = time.perf_counter()
      losses[name].append(step(tokens))  # float(): waits for the step
      if index >= warmup:
        times[name].append(time.perf_counter() - start)
  return losses, times


def _row(base: dict[str, Any], system: str, times: list[float], tokens: int,
         final_loss: float | None, loss_diff: float | None) -> dict[str, Any]:
  median = statistics.median(times)
  return dict(base, system=system, tokens_per_s=round(tokens / median, 1),
              tokens_per_s_range=[round(tokens / max(times), 1), round(tokens / min(times), 1)],
              step_s=round(median, 4),
              final_loss=None if final_loss is None else round(final_loss, 4),
              max_loss_diff=None if loss_diff is None else round(loss_diff, 5))


def run_rows(sizes: tuple[str, ...], targets: dict[str, ModelConfig], batch: int, seq_len: int,
             steps: int, warmup: int, threads: int) -> list[dict[str, Any]]:
  """The train rows of every size, printed as they come."""
  rows = []
  for size in sizes:
    rows += measure(size, targets[size], batch, seq_len, steps, warmup, threads)
    harness.print_table(rows, ("target", "params", "system", "batch", "seq_len", "tokens_per_s",
                               "step_s", "ratio_vs_hf", "final_loss", "max_loss_diff"))
  return rows

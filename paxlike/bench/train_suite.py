"""The `train` suite: step time, tokens/s and model-FLOPs utilisation of the train step.

MFU is measured against this machine's own float32 matmul peak (`harness.matmul_peak_flops`),
so it says how much of the achievable matmul throughput the whole step (attention, norms,
optimizer, data transfer included) attains. One profiled step says where the rest goes: the
shares of its span when a matmul runs, when only other operations run, and when none runs
(`op_profile.busy_split`); and the step's own matrix products, run bare (`matmul_floor`), give
its floor: `step_over_floor` is how many times that the whole step takes.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from typing import Any

import jax

from models.config import ModelConfig
from paxlike import config as config_lib
from paxlike import registry
from paxlike.bench import harness, matmul_floor, op_profile
from paxlike.config import Experiment
from paxlike.train import Trainer


def train_flops_per_token(model: ModelConfig, seq_len: int) -> float:
  """Forward + backward FLOPs per token: 6 x matmul params + attention scores and values.

  Matmul params exclude the embedding lookup but include the output projection. Attention counts
  the full (not causally halved) T x T score and value products: 12 * layers * T * heads * head_dim.
  """
  d, hd = model.d_model, model.resolved_head_dim
  per_layer = d * hd * (model.num_heads * 2 + model.num_kv_heads * 2) + 3 * d * model.mlp_dim
  matmul_params = model.num_layers * per_layer + d * model.vocab_size
  attention = 12 * model.num_layers * seq_len * model.num_heads * hd
  return 6 * matmul_params + attention


def bench_experiment(exp: Experiment, steps: int, peak: float) -> dict[str, Any]:
  """Compiles and times the train step of `exp` on synthetic-free real batches."""
  with tempfile.TemporaryDirectory() as workdir:
    trainer = Trainer(exp, workdir, log=lambda _: None)
    state = trainer.init_state()
    iterator = trainer.train_iterator()
    batches = [trainer.to_global_batch(next(iterator)) for _ in range(steps + 1)]
    start = time.perf_counter()
    state, metrics = trainer.train_step(state, batches[0])
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    compiled = trainer.lowered_train_step(state, batches[0]).compile()
    memory = compiled.memory_analysis()
    times = []
    for batch in batches[1:]:
      start = time.perf_counter()
      state, metrics = trainer.train_step(state, batch)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - start)
    holder = {"state": state}

    def profiled_step():
      holder["state"], out = trainer.train_step(holder["state"], batches[-1])
      jax.block_until_ready(out)

    busy = op_profile.busy_split(op_profile.trace_events(profiled_step),
                                 op_profile.matmul_instructions(compiled.as_text()))
    # the floor: the step's own matrix products run bare, timed after the steps (timed beside
    # them, it slowed them; `compare_hf_train`)
    bare = matmul_floor.bare_program(matmul_floor.jaxpr_dots(
        trainer.train_step_jaxpr(holder["state"], batches[-1])))
    bare()
    floor = harness.time_calls(bare, steps)["median_s"]
    span = sum(busy.values()) or 1.0
    times.sort()
    median = times[len(times) // 2]
    tokens = exp.train.batch_size * exp.data.seq_len
    flops = train_flops_per_token(exp.model, exp.data.seq_len) * tokens
    return {
        "experiment": exp.name,
        "remat": exp.train.remat,
        "params": Trainer.param_count(state.params),
        "batch": exp.train.batch_size,
        "seq_len": exp.data.seq_len,
        "devices": trainer.mesh.size,
        "compile_s": compile_s,
        "step_s": median,
        "step_s_min": times[0],
        "step_s_max": times[-1],
        "tokens_per_s": tokens / median,
        "model_tflops_per_s": flops / median / 1e12,
        "peak_tflops_per_s": peak / 1e12,
        "mfu": flops / median / peak,
        # The step's compiled scratch memory per device: activations kept for the backward pass.
        "temp_mib": memory.temp_size_in_bytes / 2**20 if memory else None,
        # One profiled step: shares of its span when a matmul runs, when only other operations
        # run, and when none runs (the runtime dispatching the next one).
        "matmul_share": busy["matmul_s"] / span,
        "other_share": busy["other_s"] / span,
        "idle_share": busy["idle_s"] / span,
        # the step's matrix products alone (median seconds), and the step's time over theirs
        "matmul_floor_s": floor,
        "step_over_floor": median / floor,
    }


def run(experiments: list[str], steps: int, out: str | None,
        remat: tuple[str, ...] = ("none",)) -> dict[str, Any]:
  """Each experiment under each remat policy (`train.remat`)."""
  registry.load_modules()
  peak = harness.matmul_peak_flops()
  rows = []
  for name in experiments:
    for policy in remat:
      exp = registry.get(name)
      exp = config_lib.validate(dataclasses.replace(
          exp, mesh=dataclasses.replace(exp.mesh, data=-1),
          train=dataclasses.replace(exp.train, remat=policy)))
      rows.append(bench_experiment(exp, steps, peak))
  harness.print_table(rows, ["experiment", "remat", "params", "batch", "seq_len", "compile_s",
                             "step_s", "tokens_per_s", "mfu", "temp_mib", "matmul_share",
                             "other_share", "idle_share", "matmul_floor_s", "step_over_floor"])
  return harness.write_report(out, "train", {"experiments": experiments, "steps": steps,
                                             "remat": list(remat)}, rows)

"""The `parallelism` suite: per-device memory and time of sequence-parallel attention.

For each sequence length it compiles forward + backward of a scalar loss of causal self-attention
(B=1, H=KVH=8, D=64, float32) and reads the compiled per-device temporary memory
(`memory_analysis().temp_size_in_bytes`):

* `dense`: `models.attention.attend` on one device, the baseline;
* `dense-sharded`: the same on inputs sharded over 'sequence', partitioned by the compiler;
* `ring`, `allgather`, `ulysses`: `parallelism.sequence_attention` over the 'sequence' axis.

Lengths up to `timed_up_to` are also run: the median wall time of `repeats` calls after one
warm-up call (compile time is reported apart). It needs several devices; `python -m paxlike.bench
parallelism` simulates 8 host CPU devices unless XLA_FLAGS already sets a device count.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from models.attention import attend
from paxlike.bench import harness
from paxlike.errors import UserError
from parallelism import rules
from parallelism.mesh import make_mesh
from parallelism.sequence_attention import VARIANTS, attention

ATTENTIONS = ("dense", "dense-sharded") + VARIANTS
SEQ_LENS = (2048, 4096, 8192, 16384, 32768)
SHAPE = {"batch": 1, "heads": 8, "kv_heads": 8, "head_dim": 64}


def _attention(name: str) -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array]:
  """(q, k, v) -> causal attention output with the named implementation."""
  if name.startswith("dense"):
    def dense(q, k, v):
      steps = q.shape[1]
      return attend(q, k, v, jnp.tril(jnp.ones((1, steps, steps), bool)))
    return dense
  return lambda q, k, v: attention(q, k, v, kind=name, causal=True)


def _fwd_bwd(name: str):
  """Jitted (q, k, v) -> (loss, (dq, dk, dv)) of loss = mean(attention(q, k, v)**2)."""
  fn = _attention(name)
  return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.mean(fn(q, k, v) ** 2), argnums=(0, 1, 2)))


def _inputs(seq_len: int, sharding, abstract: bool) -> tuple:
  """q, k, v [B, T, H or KVH, D] float32: shapes only, or normal draws placed with `sharding`."""
  shapes = [(SHAPE["batch"], seq_len, SHAPE[h], SHAPE["head_dim"])
            for h in ("heads", "kv_heads", "kv_heads")]
  if abstract:
    return tuple(jax.ShapeDtypeStruct(s, jnp.float32, sharding=sharding) for s in shapes)
  rng = np.random.default_rng(0)
  return tuple(jax.device_put(rng.standard_normal(s, np.float32), sharding) for s in shapes)


def bench_one(name: str, seq_len: int, mesh, timed: bool, repeats: int) -> dict[str, Any]:
  """Compiles (and if `timed`, runs) forward + backward of one attention at one length."""
  one_device = name == "dense"
  sharding = (jax.sharding.SingleDeviceSharding(jax.devices()[0]) if one_device
              else NamedSharding(mesh, PartitionSpec(None, "sequence")))
  row: dict[str, Any] = {"attention": name, "seq_len": seq_len,
                         "devices": 1 if one_device else mesh.size}
  with contextlib.nullcontext() if one_device else rules.activate(mesh):
    start = time.perf_counter()
    compiled = _fwd_bwd(name).lower(*_inputs(seq_len, sharding, abstract=True)).compile()
    row["compile_s"] = time.perf_counter() - start
    row["temp_bytes_per_device"] = compiled.memory_analysis().temp_size_in_bytes
    row["temp_mib_per_device"] = row["temp_bytes_per_device"] / 2**20
    row.update(fwd_bwd_s=None, fwd_bwd_s_min=None, fwd_bwd_s_max=None)
    if timed:
      inputs = _inputs(seq_len, sharding, abstract=False)
      call = lambda: jax.block_until_ready(compiled(*inputs))
      call()
      timing = harness.time_calls(call, repeats)
      row.update(fwd_bwd_s=timing["median_s"], fwd_bwd_s_min=timing["min_s"],
                 fwd_bwd_s_max=timing["max_s"])
  return row


def run(out: str | None, seq_lens=SEQ_LENS, timed_up_to: int = 8192,
        repeats: int = 3) -> dict[str, Any]:
  """Benchmarks every attention at every length on a mesh with all devices on 'sequence'."""
  if jax.device_count() < 2:
    raise UserError(
        f"the parallelism suite needs several devices, found {jax.device_count()}; run it as "
        "`python -m paxlike.bench parallelism` (simulates 8 CPU devices) or set XLA_FLAGS="
        "--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu")
  mesh = make_mesh(data=1, sequence=-1)
  rows = []
  for seq_len in seq_lens:
    group = [bench_one(name, seq_len, mesh, seq_len <= timed_up_to, repeats)
             for name in ATTENTIONS]
    for row in group:  # group[0] is one-device dense
      row["vs_dense"] = row["temp_bytes_per_device"] / group[0]["temp_bytes_per_device"]
    rows += group
  harness.print_table(rows, ["attention", "seq_len", "devices", "temp_mib_per_device",
                             "vs_dense", "compile_s", "fwd_bwd_s"])
  config = {**SHAPE, "dtype": "float32", "causal": True, "seq_lens": list(seq_lens),
            "timed_up_to": timed_up_to, "repeats": repeats, "mesh": dict(mesh.shape)}
  return harness.write_report(out, "parallelism", config, rows)

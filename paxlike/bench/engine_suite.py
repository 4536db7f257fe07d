"""The `engine` suite: what the decode engine costs beyond its model calls, against floors.

Random-weight models of the repository's own shapes (the demo draft, the demo target, the pair
target and the compare-hf 50M target), float32 unless `--dtype`, prompts of 32 tokens:

* **AR step** (`ar_ms`): the compiled KV-cache AR sampler's wall time per model call (greedy,
  up to `new_tokens` per row, the prefill counted as one call), at each batch size.
* **Floors**, measured in the same run and interleaved with the AR runs: `chain_ms`, a compiled
  loop over the bare chain of the model's matmuls with the same weights (no attention, norms,
  sampling or cache), and `bandwidth_ms`, the weights' bytes over this machine's measured memory
  read bandwidth. `of_chain` and `of_bandwidth` are floor / AR time: 1.0 means AR runs at the
  floor. `vs_batch_1` is AR's step time over the same shape's at batch 1.
* **Overhead ratios** of the drafted samplers (speculative, spectr, tree, dynamic_tree,
  adaptive) with the 0.07M draft: one run under `jax.profiler`, each XLA thunk charged to a
  model call or to the engine (`op_profile`); `overhead_ratio` = profiled time / time in model
  calls (1.0: nothing but model calls). AR's own row is the reference.
* **Per-op profiles** of one AR decode and one speculative decode (`profiles` in the JSON; the
  top instructions are printed).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from models.causal_lm import CausalLM
from models.config import ModelConfig
from paxlike import config as config_lib
from paxlike import generate, registry
from paxlike.bench import harness, op_profile
from paxlike.bench.compare_hf_suite import TARGETS
from paxlike.config import SamplerConfig

PROMPT_LEN = 32
DRAFT_SHAPE = "0.07M"
DRAFTED = ("speculative", "spectr", "tree", "dynamic_tree", "adaptive")


def shapes() -> dict[str, ModelConfig]:
  """The measured model shapes, by approximate parameter count."""
  registry.load_modules()
  return {"0.07M": registry.get("demo_draft").model, "1.6M": registry.get("demo").model,
          "9.5M": registry.get("pair_target").model, "51M": TARGETS["50M"]}


def random_model(config: ModelConfig, dtype: str, seed: int = 0) -> tuple[CausalLM, Any]:
  model = CausalLM(dataclasses.replace(config, dtype=dtype))
  return model, model.init(jax.random.key(seed))


def memory_bandwidth(megabytes: int = 256, repeats: int = 7) -> float:
  """Bytes per second this machine reads from memory (a compiled sum over a large array)."""
  data = jnp.ones((megabytes * 2**20 // 4,), jnp.float32)
  total = jax.jit(jnp.sum)
  total(data).block_until_ready()
  timing = harness.time_calls(lambda: total(data).block_until_ready(), repeats)
  return data.nbytes / timing["min_s"]


def matmul_chain(params: dict, config: ModelConfig, batch: int, steps: int):
  """A compiled `steps`-step loop over the model's matmuls alone (the floor of a decode step):
  per layer x@Wq, x@Wk, x@Wv, q@Wo, x@Wgate, x@Wup, h@Wdown, then the output head, with the
  same weights in the compute dtype. Returns a function that runs it and blocks."""
  dtype = jnp.dtype(config.dtype)
  flat = lambda w, n: jnp.asarray(w, dtype).reshape(-1, n) if n else jnp.asarray(w, dtype)
  layers = []
  for i in range(config.num_layers):
    block = params[f"blocks_{i}"]
    attn, mlp = block["attention"], block["mlp"]
    kernel = lambda module: module["kernel"]
    q, k, v = (kernel(attn[n]) for n in ("query", "key", "value"))
    layers.append((q.reshape(q.shape[0], -1).astype(dtype), k.reshape(k.shape[0], -1).astype(dtype),
                   v.reshape(v.shape[0], -1).astype(dtype),
                   flat(kernel(attn["out"]), config.d_model),
                   flat(kernel(mlp["gate"]), 0), flat(kernel(mlp["up"]), 0),
                   flat(kernel(mlp["down"]), 0)))
  head = (params["embed"]["embedding"].T if config.tie_embeddings
          else params["head"]["kernel"]).astype(dtype)
  weights = (tuple(layers), head)

  @jax.jit
  def run(weights, x):
    layers, head = weights

    def step(_, carry):
      x, acc = carry
      for wq, wk, wv, wo, wg, wu, wd in layers:
        q, k, v = x @ wq, x @ wk, x @ wv
        x = x + q @ wo + (jnp.sum(k) + jnp.sum(v)) * 1e-6
        x = x + (jax.nn.silu(x @ wg) * (x @ wu)) @ wd
      logits = x @ head
      return x * 0.5, acc + logits[:, 0].astype(jnp.float32)

    return jax.lax.fori_loop(0, steps, step, (x, jnp.zeros((x.shape[0],), jnp.float32)))

  x = jnp.ones((batch, config.d_model), dtype) * 0.01
  run(weights, x)[1].block_until_ready()
  return lambda: run(weights, x)[1].block_until_ready()


def _prompts(batch: int, vocab: int) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(batch)
  return (rng.integers(1, vocab, (batch, PROMPT_LEN)).astype(np.int32),
          np.full((batch,), PROMPT_LEN, np.int32))


def _decoder(model, params, batch: int, cfg: SamplerConfig, draft=None, draft_params=None):
  prompt, lengths = _prompts(batch, model.vocab_size)
  return generate.CompiledDecoder(model, params, prompt, lengths, cfg, draft, draft_params)


def ar_rows(shape_names, batches, new_tokens: int, repeats: int, dtype: str, bandwidth: float,
            keep: dict | None = None) -> list[dict[str, Any]]:
  """AR step time against its floors for every shape and batch size. The decoders whose
  (shape, batch) is a key of `keep` are stored there (for `overhead_rows`, saving a compile)."""
  rows = []
  cfg = SamplerConfig(kind="ar", max_new_tokens=new_tokens, temperature=0.0)
  for name in shape_names:
    config = shapes()[name]
    model, params = random_model(config, dtype)
    weight_bytes = sum(x.size for x in jax.tree.leaves(params)) * jnp.dtype(dtype).itemsize
    single = None
    for batch in batches:
      decoder = _decoder(model, params, batch, cfg)
      if keep is not None and (name, batch) in keep:
        keep[name, batch] = decoder
      calls = int(decoder.run().stats["model_calls"])  # steps run (a random model may emit eos)
      chain = matmul_chain(params, model.config, batch, new_tokens)
      (ar_t, chain_t), _ = harness.interleaved_times([decoder.run, chain], repeats)
      ar_ms = statistics.median(ar_t) / calls * 1e3
      chain_ms = statistics.median(chain_t) / new_tokens * 1e3
      bandwidth_ms = weight_bytes / bandwidth * 1e3
      single = single or ar_ms
      rows.append({
          "shape": name, "params_m": round(weight_bytes / jnp.dtype(dtype).itemsize / 1e6, 2),
          "batch": batch, "ar_ms": round(ar_ms, 4),
          "ar_ms_range": [round(min(ar_t) / calls * 1e3, 4), round(max(ar_t) / calls * 1e3, 4)],
          "chain_ms": round(chain_ms, 4), "bandwidth_ms": round(bandwidth_ms, 4),
          "of_chain": round(chain_ms / ar_ms, 3), "of_bandwidth": round(bandwidth_ms / ar_ms, 3),
          "vs_batch_1": round(ar_ms / single, 2)})
      print(f"  AR {name} batch {batch}: {ar_ms:.3f} ms/token, chain {chain_ms:.3f} ms",
            flush=True)
  return rows


def overhead_rows(targets, batches, new_tokens: int, repeats: int, dtype: str,
                  samplers=DRAFTED, ar_decoders: dict | None = None
                  ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
  """Each drafted sampler's time against the time of the model calls it made (greedy), and the
  per-op profiles of AR and speculative decoding. `ar_decoders`: AR decoders already compiled
  by `ar_rows` for (target, batch), the same program on the same weights (seed 0)."""
  draft, draft_params = random_model(shapes()[DRAFT_SHAPE], dtype, seed=1)
  rows, profiles = [], {}
  for name in targets:
    model, params = random_model(shapes()[name], dtype)
    for batch in batches:
      for kind in ("ar", *samplers):
        cfg = dataclasses.replace(  # gamma 4 for the kinds that have it
            SamplerConfig(kind="speculative", max_new_tokens=new_tokens, temperature=0.0,
                          num_draft_tokens=4), kind=kind)
        decoder = (ar_decoders or {}).get((name, batch)) if kind == "ar" else None
        decoder = decoder or _decoder(model, params, batch, cfg,
                                      *((draft, draft_params) if kind != "ar" else ()))
        out = decoder.run()
        wall = harness.time_calls(decoder.run, repeats)["median_s"]
        ops = op_profile.profile(decoder.run, decoder.hlo_text())
        split = op_profile.shares(ops)
        stats = decoder.result(out, wall)[2]
        rows.append({
            "sampler": kind, "target": name, "draft": DRAFT_SHAPE if kind != "ar" else None,
            "batch": batch, "wall_ms": round(wall * 1e3, 2),
            "model_share": round(split["model"] / split["total"], 3),
            "overhead_ratio": round(split["total"] / split["model"], 3),
            "target_calls": stats.get("target_calls", stats["model_calls"]),
            "draft_calls": stats.get("draft_calls", 0),
            "tokens_per_target_call": stats.get("tokens_per_target_call", 1.0)})
        print(f"  {kind} {name} batch {batch}: overhead {rows[-1]['overhead_ratio']}", flush=True)
        if kind in ("ar", "speculative"):
          profiles[f"{kind} {name} batch {batch}"] = op_profile.top(ops, 15)
  return rows, profiles


def run(out: str | None, shape_names=("0.07M", "1.6M", "9.5M", "51M"), batches=(1, 8, 32),
        targets=("1.6M", "9.5M"), overhead_batches=(1, 8), new_tokens: int = 128,
        repeats: int = 5, dtype: str = "float32") -> dict[str, Any]:
  """Runs the suite and writes the report (see the module docstring)."""
  start = time.perf_counter()
  bandwidth = memory_bandwidth()
  print(f"memory read bandwidth: {bandwidth / 1e9:.1f} GB/s", flush=True)
  ar_decoders = dict.fromkeys((t, b) for t in targets for b in overhead_batches)
  ar = ar_rows(shape_names, batches, new_tokens, repeats, dtype, bandwidth, keep=ar_decoders)
  harness.print_table(ar, ["shape", "params_m", "batch", "ar_ms", "chain_ms", "bandwidth_ms",
                           "of_chain", "of_bandwidth", "vs_batch_1"])
  overhead, profiles = overhead_rows(targets, overhead_batches, new_tokens, repeats, dtype,
                                     ar_decoders=ar_decoders)
  harness.print_table(overhead, ["sampler", "target", "batch", "wall_ms", "model_share",
                                 "overhead_ratio", "target_calls", "draft_calls",
                                 "tokens_per_target_call"])
  for title, table in profiles.items():
    print(f"\nper-op profile: {title}")
    harness.print_table(table, ["op", "category", "share", "us_per_run", "executions", "scope"])
  config = {"shapes": {n: config_lib.to_dict(shapes()[n]) for n in shape_names},
            "batches": list(batches), "targets": list(targets), "draft": DRAFT_SHAPE,
            "overhead_batches": list(overhead_batches), "new_tokens": new_tokens,
            "prompt_len": PROMPT_LEN, "repeats": repeats, "dtype": dtype,
            "memory_bandwidth_gb_s": round(bandwidth / 1e9, 2),
            "seconds": round(time.perf_counter() - start, 1)}
  report = harness.write_report(None, "engine", config, ar + overhead)
  report["profiles"] = profiles
  if out:
    harness.write_json(out, report)
  return report

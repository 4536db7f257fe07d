"""The `compare-hf` suite: paxlike's decoders against Hugging Face transformers on the same weights.

For each target size (~10M and ~50M parameters) one set of float32 weights is drawn, exported
with `interchange.save_hf` and loaded by `transformers.LlamaForCausalLM.from_pretrained`, so both
systems run the same numbers. Rows at batch 1 and 8 on the same random prompts:

  hf       ar           `generate(do_sample=False)` (KV cache, eager torch)
  hf       speculative  `generate(assistant_model=draft)` with `num_assistant_tokens=gamma`
                        (constant schedule); transformers supports it at batch 1 only
  paxlike  ar           `samplers.ar` compiled (one `while_loop`)
  paxlike  speculative  `samplers.speculative` compiled, same draft and gamma, greedy

and, with `parts` including "train", a training row per system (`compare_hf_train`: the same
weights, batches and AdamW step in PyTorch and in paxlike's train step).

The draft is the target's embedding, first `draft_layers` blocks, final norm and head; the
target's later blocks have their output projections damped by `damping`, so the draft agrees
with the target's argmax often but not always (random weights, nothing trained: acceptance is set
by this construction, not learned; the speed comparison is what this suite measures).

Both systems get the same CPU threads: `python -m paxlike.bench compare-hf --threads=N` pins the
process to N cores before jax starts (which bounds XLA's thread pool) and this suite sets
`torch.set_num_threads(N)`. Times are medians of `repeats` runs after
a warm-up (paxlike: ahead-of-time compiled; compile time reported apart). `greedy_equal` compares
each row's tokens with HF greedy's (paxlike ar) or HF assisted's (speculative); `near_ties`
counts generated positions whose target top-two logits differ by < 1e-4.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from models.causal_lm import CausalLM
from models.config import ModelConfig
from paxlike import interchange
from paxlike.bench import compare_hf_train, harness
from paxlike.errors import UserError
from samplers import ar, speculative
from samplers.core.logits import SamplingParams

NEAR_TIE = 1e-4
PROMPT_LEN = 32
# ~10M and ~50M-parameter targets (untied 4096-token vocabulary; 2-layer drafts).
TARGETS = {
    "10M": ModelConfig(vocab_size=4096, num_layers=12, d_model=256, num_heads=4, num_kv_heads=4,
                       mlp_dim=640, max_len=256, tie_embeddings=False, init_std=0.05),
    "50M": ModelConfig(vocab_size=4096, num_layers=16, d_model=512, num_heads=8, num_kv_heads=4,
                       mlp_dim=1408, max_len=256, tie_embeddings=False, init_std=0.035),
}


def make_pair(config: ModelConfig, draft_layers: int, damping: float,
              seed: int = 0) -> tuple[CausalLM, Any, CausalLM, Any]:
  """(target, target params, draft, draft params): the draft is the target's first blocks."""
  target = CausalLM(config)
  params = jax.tree.map(np.asarray, target.init(jax.random.key(seed)))
  for layer in range(draft_layers, config.num_layers):
    block = params[f"blocks_{layer}"]
    block["attention"]["out"]["kernel"] = block["attention"]["out"]["kernel"] * damping
    block["mlp"]["down"]["kernel"] = block["mlp"]["down"]["kernel"] * damping
  draft = CausalLM(dataclasses.replace(config, num_layers=draft_layers))
  draft_params = {k: v for k, v in params.items()
                  if not k.startswith("blocks_") or int(k.split("_")[1]) < draft_layers}
  return target, params, draft, draft_params


def _time(fn, repeats: int) -> tuple[Any, float]:
  """(last result, median wall seconds) of `repeats` calls of `fn` after one warm-up call."""
  fn()
  (times,), (out,) = harness.interleaved_times([fn], repeats)
  return out, float(np.median(times))


def _hf_runs(torch, hf_target, hf_draft, prompts: np.ndarray, new_tokens: int, gamma: int,
             repeats: int, assisted: bool) -> dict[str, tuple[np.ndarray, float]]:
  ids = torch.tensor(prompts, dtype=torch.long)
  # No eos: N tokens per row. An explicit mask, else transformers masks prompt tokens equal to pad.
  common = dict(do_sample=False, max_new_tokens=new_tokens, pad_token_id=0,
                attention_mask=torch.ones_like(ids))

  def greedy():
    with torch.inference_mode():
      return hf_target.generate(ids, **common).numpy()[:, prompts.shape[1]:]

  def assist():
    with torch.inference_mode():
      return hf_target.generate(ids, assistant_model=hf_draft, **common).numpy()[
          :, prompts.shape[1]:]

  runs = {"ar": _time(greedy, repeats)}
  if assisted:
    hf_draft.generation_config.num_assistant_tokens = gamma
    hf_draft.generation_config.num_assistant_tokens_schedule = "constant"
    hf_draft.generation_config.assistant_confidence_threshold = 0.0
    runs["speculative"] = _time(assist, repeats)
  return runs


def _paxlike_run(method: str, target, params, draft, draft_params, prompts: np.ndarray,
                 new_tokens: int, gamma: int, repeats: int) -> tuple[np.ndarray, float, float, dict]:
  """(tokens [B, N], median seconds, compile seconds, sampler stats) of one compiled decoder."""
  greedy = SamplingParams(temperature=0.0)
  lengths = jnp.full([len(prompts)], prompts.shape[1], jnp.int32)
  key = jax.random.key(0)
  if method == "ar":
    fn, leading = ar.sample, (target, params)
    config = ar.ARConfig(max_new_tokens=new_tokens, sampling=greedy)
  else:
    fn, leading = speculative.sample, (target, params, draft, draft_params)
    config = speculative.SpeculativeConfig(num_draft_tokens=gamma, max_new_tokens=new_tokens,
                                           sampling=greedy)
  args = (*leading, jnp.asarray(prompts), lengths, key)
  start = time.perf_counter()
  compiled = fn.lower(*args, config).compile()
  compile_s = time.perf_counter() - start
  dynamic = (*leading[1::2], *args[len(leading):])
  out, seconds = _time(lambda: jax.block_until_ready(compiled(*dynamic)), repeats)
  stats = {k: float(np.asarray(v)) for k, v in out.stats.items()}
  return np.asarray(out.tokens), seconds, compile_s, stats


def _near_ties(target, params, prompts: np.ndarray, tokens: np.ndarray) -> int:
  """Generated positions of `tokens` whose target top-two logits are within NEAR_TIE."""
  sequence = jnp.asarray(np.concatenate([prompts, tokens], axis=1)[:, :-1])
  logits = np.asarray(jax.jit(target.logits)(params, sequence))[:, prompts.shape[1] - 1:]
  top2 = np.sort(logits, axis=-1)[..., -2:]
  return int(np.sum(top2[..., 1] - top2[..., 0] < NEAR_TIE))


def measure(size: str, config: ModelConfig, batches: tuple[int, ...], new_tokens: int,
            gamma: int, draft_layers: int, damping: float, repeats: int,
            threads: int) -> list[dict[str, Any]]:
  """The rows of one target size."""
  import torch
  import transformers
  torch.set_num_threads(threads)
  target, params, draft, draft_params = make_pair(config, draft_layers, damping)
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  draft_count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(draft_params))
  with tempfile.TemporaryDirectory() as tmp:
    interchange.save_hf(f"{tmp}/target", target.config, params, token_ids={})
    interchange.save_hf(f"{tmp}/draft", draft.config, draft_params, token_ids={})
    load = lambda d: transformers.LlamaForCausalLM.from_pretrained(
        d, dtype=torch.float32).eval()
    hf_target, hf_draft = load(f"{tmp}/target"), load(f"{tmp}/draft")
  params = jax.tree.map(jnp.asarray, params)
  draft_params = jax.tree.map(jnp.asarray, draft_params)
  rng = np.random.default_rng(0)
  rows = []
  for batch in batches:
    prompts = rng.integers(0, config.vocab_size, size=(batch, PROMPT_LEN)).astype(np.int32)
    hf = _hf_runs(torch, hf_target, hf_draft, prompts, new_tokens, gamma, repeats,
                  assisted=batch == 1)
    ties = _near_ties(target, params, prompts, hf["ar"][0])
    common = dict(params=count, draft_params=draft_count, batch=batch, new_tokens=new_tokens,
                  near_ties=ties)
    for method, (tokens, seconds) in hf.items():
      rows.append(dict(target=size, system="hf", method=method, **common,
                       tokens_per_s=round(tokens.size / seconds, 1), wall_s=round(seconds, 4),
                       greedy_equal=bool(np.array_equal(tokens, hf["ar"][0]))))
    for method in ("ar", "speculative"):
      tokens, seconds, compile_s, stats = _paxlike_run(
          method, target, params, draft, draft_params, prompts, new_tokens, gamma, repeats)
      baseline = method if method in hf else "ar"
      hf_tokens, hf_seconds = hf[baseline]
      row = dict(target=size, system="paxlike", method=method, **common,
                 tokens_per_s=round(tokens.size / seconds, 1), wall_s=round(seconds, 4),
                 compile_s=round(compile_s, 2),
                 ratio_vs_hf=round(hf_seconds / seconds, 2), vs_hf=f"hf {baseline}",
                 greedy_equal=bool(np.array_equal(tokens, hf_tokens)))
      if method == "speculative":
        row.update(acceptance=round(stats.get("acceptance", float("nan")), 3),
                   tokens_per_target_call=round(stats.get("tokens_per_target_call",
                                                          float("nan")), 2))
      rows.append(row)
  return rows


COLUMNS = ("target", "params", "system", "method", "batch", "tokens_per_s", "ratio_vs_hf",
           "vs_hf", "greedy_equal", "near_ties", "acceptance", "compile_s")


def run(out: str | None, sizes: tuple[str, ...] = ("10M", "50M"), batches: tuple[int, ...] = (1, 8),
        new_tokens: int = 64, gamma: int = 4, draft_layers: int = 2, damping: float = 0.05,
        repeats: int = 3, threads: int = 2, parts: tuple[str, ...] = ("decode", "train"),
        train_batch: int = 8, train_seq_len: int = 256, train_steps: int = 5,
        train_warmup: int = 2) -> dict[str, Any]:
  """Measures every size (decode rows, then train rows), prints the tables and writes the JSON
  report."""
  try:
    import torch
    import transformers
  except ImportError as e:
    raise UserError(f"compare-hf needs the hf extra ({e}); pip install -e '.[hf]'") from None
  unknown = [s for s in sizes if s not in TARGETS]
  if unknown:
    raise UserError(f"unknown size(s) {unknown}; valid: {', '.join(TARGETS)}")
  unknown = [p for p in parts if p not in ("decode", "train")]
  if unknown:
    raise UserError(f"unknown part(s) {unknown}; valid: decode, train")
  rows = []
  for size in sizes if "decode" in parts else ():
    rows += measure(size, TARGETS[size], batches, new_tokens, gamma, draft_layers, damping,
                    repeats, threads)
    harness.print_table(rows, COLUMNS)
  if "train" in parts:
    rows += compare_hf_train.run_rows(sizes, TARGETS, train_batch, train_seq_len, train_steps,
                                      train_warmup, threads)
  config = {"threads": threads, "torch_threads": torch.get_num_threads(),
            "cpu_affinity": len(os.sched_getaffinity(0)), "new_tokens": new_tokens,
            "prompt_len": PROMPT_LEN, "gamma": gamma, "draft_layers": draft_layers,
            "damping": damping, "repeats": repeats, "dtype": "float32", "parts": list(parts),
            "train": {"batch": train_batch, "seq_len": train_seq_len, "steps": train_steps,
                      "warmup": train_warmup,
                      "optimizer": dataclasses.asdict(compare_hf_train.OPTIMIZER)},
            "torch": torch.__version__, "transformers": transformers.__version__,
            "targets": {s: dataclasses.asdict(TARGETS[s]) for s in sizes},
            "draft": "the target's embedding, first draft_layers blocks, final norm and head; "
                     "later target blocks' output projections scaled by damping; random "
                     "weights (nothing trained)"}
  return harness.write_report(out, "compare-hf", config, rows)

"""Text in, text out: encode prompts, run a compiled sampler, decode, and measure it.

Prompts start with the eos id (the training stream separates documents with eos, so eos means
"start of a document"), are right-padded into one batch and decoded by `samplers.ar`.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from paxlike import tokenizer
from paxlike.config import SamplerConfig
from paxlike.errors import UserError
from samplers import ar
from samplers.logits import SamplingParams


def encode_prompts(prompts: list[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Right-padded [B, P] int32 prompt ids (eos first) and their lengths [B]."""
  encoded = [np.concatenate([[tokenizer.EOS_ID], tokenizer.encode(p)]) for p in prompts]
  for i, ids in enumerate(encoded):
    if len(ids) >= max_len:
      raise UserError(
          f"prompt {i} is {len(ids)} tokens long (with its start token) but model.max_len is "
          f"{max_len}; shorten the prompt to at most {max_len - 2} bytes")
  return ar.pad_prompts(encoded, tokenizer.PAD_ID)


def ar_config(cfg: SamplerConfig, max_new_tokens: int) -> ar.ARConfig:
  return ar.ARConfig(
      max_new_tokens=max_new_tokens,
      sampling=SamplingParams(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p),
      eos_id=tokenizer.EOS_ID, pad_id=tokenizer.PAD_ID)


def generate(model: Any, params: Any, prompts: list[str],
             cfg: SamplerConfig) -> tuple[list[str], dict[str, Any]]:
  """Continuations of `prompts` and statistics (tokens, tokens/s, model calls, times).

  Generation stops at eos or at `cfg.max_new_tokens`, shortened so prompt + generation fits in
  `model.max_len`. The sampler is compiled ahead of time; compile time is reported apart.
  """
  prompt, lengths = encode_prompts(prompts, model.max_len)
  max_new = min(cfg.max_new_tokens, model.max_len - prompt.shape[1])
  config = ar_config(cfg, max_new)
  key = jax.random.key(cfg.seed)
  args = (params, jnp.asarray(prompt), jnp.asarray(lengths), key)
  start = time.perf_counter()
  compiled = ar.sample.lower(model, *args, config).compile()
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  out = jax.block_until_ready(compiled(*args))
  wall_s = time.perf_counter() - start
  tokens = np.asarray(out.tokens)
  counts = np.asarray(out.lengths)
  texts = [tokenizer.decode(tokens[i, :counts[i]]) for i in range(len(prompts))]
  generated = int(counts.sum())
  stats = {
      "sampler": cfg.kind,
      "batch": len(prompts),
      "tokens": generated,
      "tokens_per_s": round(generated / wall_s, 1),
      "model_calls": int(out.stats["model_calls"]),
      "wall_s": round(wall_s, 4),
      "compile_s": round(compile_s, 3),
  }
  return texts, stats

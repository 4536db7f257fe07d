"""Hugging Face Llama <-> paxlike Llama: `config.json` fields and weight names and layouts (numpy).

Pure mappings with no file I/O (`paxlike.interchange` reads and writes directories). Both models
are the same function: pre-norm blocks, RMSNorm, grouped-query attention with rotary embeddings in
the rotate-half layout (feature i pairs with i + D/2; Hugging Face stores q/k projections already
permuted for it, so no permutation is needed), SwiGLU MLP, optional tied embeddings. Only the
layouts differ: a torch `nn.Linear` weight is [out, in], a paxlike kernel is [in, *out] with heads
split out, e.g. `q_proj.weight` [H*D, E] <-> `query/kernel` [E, H, D].
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from models.config import ModelConfig

ARCHITECTURE = "LlamaForCausalLM"
MODEL_TYPE = "llama"
# Fields of ModelConfig that a Hugging Face config.json decides; the others (max_len, dtype,
# attention, init_std, kind, init_from) stay as the experiment sets them.
SHAPE_FIELDS = ("vocab_size", "num_layers", "d_model", "num_heads", "num_kv_heads", "head_dim",
                "mlp_dim", "rope_theta", "rope_scaling", "rope_factor", "rope_low_freq_factor",
                "rope_high_freq_factor", "rope_original_max_len", "norm_eps", "tie_embeddings")
_ROPE_TYPES = {"default": "none", "linear": "linear", "llama3": "llama3"}
_SKIPPED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old checkpoints store


def model_config(hf: Mapping[str, Any], base: ModelConfig = ModelConfig()) -> ModelConfig:
  """`base` with its SHAPE_FIELDS taken from a Hugging Face Llama `config.json` dict.

  Raises ValueError naming the first field paxlike's Llama does not implement (another
  architecture, biases, another activation, an unsupported rope type).
  """
  architectures = hf.get("architectures") or [ARCHITECTURE]
  if hf.get("model_type", MODEL_TYPE) != MODEL_TYPE or ARCHITECTURE not in architectures:
    raise ValueError(f"model_type={hf.get('model_type')!r}, architectures={architectures} is not "
                     f"a Llama model; paxlike imports model_type 'llama' ({ARCHITECTURE})")
  for key, expected in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False),
                        ("pretraining_tp", 1)):
    if hf.get(key, expected) != expected:
      raise ValueError(f"{key}={hf[key]!r} is not supported; paxlike's Llama needs {expected!r}")
  rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type not in _ROPE_TYPES:
    raise ValueError(f"rope type {rope_type!r} is not supported; supported: "
                     f"{', '.join(_ROPE_TYPES)}")
  if rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
    raise ValueError("partial_rotary_factor != 1 is not supported (paxlike rotates whole heads)")
  d_model, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
  head_dim = int(hf.get("head_dim") or d_model // heads)
  fields = dict(
      vocab_size=int(hf["vocab_size"]), num_layers=int(hf["num_hidden_layers"]), d_model=d_model,
      num_heads=heads, num_kv_heads=int(hf.get("num_key_value_heads") or heads),
      head_dim=0 if head_dim * heads == d_model else head_dim,
      mlp_dim=int(hf["intermediate_size"]),
      rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
      rope_scaling=_ROPE_TYPES[rope_type],
      rope_factor=float(rope.get("factor", 1.0)) if rope_type != "default" else 1.0,
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)))
  if rope_type == "llama3":  # the ramp's parameters, as transformers reads them
    fields.update(
        rope_low_freq_factor=float(rope["low_freq_factor"]),
        rope_high_freq_factor=float(rope["high_freq_factor"]),
        rope_original_max_len=int(rope.get("original_max_position_embeddings",
                                           hf["max_position_embeddings"])))
  else:
    defaults = ModelConfig()
    fields.update(rope_low_freq_factor=defaults.rope_low_freq_factor,
                  rope_high_freq_factor=defaults.rope_high_freq_factor,
                  rope_original_max_len=defaults.rope_original_max_len)
  config = dataclasses.replace(base, kind="llama", **fields)
  config.validate()
  return config


def hf_config(cfg: ModelConfig, token_ids: Mapping[str, int] | None = None) -> dict[str, Any]:
  """The `config.json` dict of `cfg` for transformers' LlamaForCausalLM (float32 weights).

  token_ids: optional bos_token_id / eos_token_id / pad_token_id entries.
  """
  rope = None
  if cfg.rope_scaling == "linear":
    rope = {"rope_type": "linear", "factor": cfg.rope_factor}
  elif cfg.rope_scaling == "llama3":
    rope = {"rope_type": "llama3", "factor": cfg.rope_factor,
            "low_freq_factor": cfg.rope_low_freq_factor,
            "high_freq_factor": cfg.rope_high_freq_factor,
            "original_max_position_embeddings": cfg.rope_original_max_len}
  return {
      "architectures": [ARCHITECTURE], "model_type": MODEL_TYPE, "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.d_model, "intermediate_size": cfg.mlp_dim,
      "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.resolved_head_dim,
      "hidden_act": "silu", "max_position_embeddings": cfg.max_len, "rms_norm_eps": cfg.norm_eps,
      "rope_theta": cfg.rope_theta, "rope_scaling": rope,
      "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False, "mlp_bias": False,
      "initializer_range": cfg.init_std, "torch_dtype": "float32", "dtype": "float32",
      **dict(token_ids or {})}


def _table(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...], tuple[str, ...], tuple[int, ...]]]:
  """(HF name, HF shape, paxlike path, paxlike shape) of every tensor of `cfg`.

  A 2-D HF weight [out, in] maps to a paxlike kernel by transposing and splitting heads out
  (`w.T.reshape(paxlike shape)`); the embedding and norm scales are taken as they are.
  """
  e, h, kvh, d, m, v = (cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim,
                        cfg.mlp_dim, cfg.vocab_size)
  rows = [("model.embed_tokens.weight", (v, e), ("embed", "embedding"), (v, e)),
          ("model.norm.weight", (e,), ("final_norm", "scale"), (e,))]
  for i in range(cfg.num_layers):
    p, b = f"model.layers.{i}.", f"blocks_{i}"
    rows += [
        (p + "self_attn.q_proj.weight", (h * d, e), (b, "attention", "query", "kernel"), (e, h, d)),
        (p + "self_attn.k_proj.weight", (kvh * d, e), (b, "attention", "key", "kernel"),
         (e, kvh, d)),
        (p + "self_attn.v_proj.weight", (kvh * d, e), (b, "attention", "value", "kernel"),
         (e, kvh, d)),
        (p + "self_attn.o_proj.weight", (e, h * d), (b, "attention", "out", "kernel"), (h, d, e)),
        (p + "mlp.gate_proj.weight", (m, e), (b, "mlp", "gate", "kernel"), (e, m)),
        (p + "mlp.up_proj.weight", (m, e), (b, "mlp", "up", "kernel"), (e, m)),
        (p + "mlp.down_proj.weight", (e, m), (b, "mlp", "down", "kernel"), (m, e)),
        (p + "input_layernorm.weight", (e,), (b, "attention_norm", "scale"), (e,)),
        (p + "post_attention_layernorm.weight", (e,), (b, "mlp_norm", "scale"), (e,))]
  if not cfg.tie_embeddings:
    rows.append(("lm_head.weight", (v, e), ("head", "kernel"), (e, v)))
  return rows


def _transposed(hf_name: str) -> bool:
  return hf_name.endswith("proj.weight") or hf_name == "lm_head.weight"


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Every tensor name a Hugging Face checkpoint of `cfg` has, with its shape."""
  return {name: shape for name, shape, _, _ in _table(cfg)}


def unused_names(cfg: ModelConfig, names) -> list[str]:
  """Tensor names of a checkpoint that `cfg` has no place for (a tied checkpoint's lm_head copy
  and rotary buffers are expected and not listed)."""
  expected = set(hf_shapes(cfg)) | {"lm_head.weight"}
  return sorted(n for n in names if n not in expected and not n.endswith(_SKIPPED_SUFFIXES))


def params_from_hf(cfg: ModelConfig, tensors: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """paxlike float32 params (nested dict of numpy) of `cfg` from Hugging Face tensors, whose
  names and shapes must be those of `hf_shapes(cfg)`."""
  params: dict[str, Any] = {}
  for name, _, path, shape in _table(cfg):
    value = np.asarray(tensors[name], np.float32)
    value = value.T.reshape(shape) if _transposed(name) else value
    node = params
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = np.ascontiguousarray(value)
  return params


def params_to_hf(cfg: ModelConfig, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Hugging Face float32 tensors (contiguous numpy) of paxlike `params` of `cfg`.

  Raises ValueError if a parameter is missing, has another shape, or has no HF counterpart.
  """
  table = _table(cfg)
  extra = sorted(set(_paths(params)) - {"/".join(path) for _, _, path, _ in table})
  if extra:
    raise ValueError(f"params hold {', '.join(extra[:3])}, which a Hugging Face Llama has no "
                     "place for (e.g. ParScale or an acceptance head); export a plain Llama")
  out = {}
  for name, hf_shape, path, shape in table:
    node: Any = params
    for key in path:
      if key not in node:
        raise ValueError(f"params have no {'/'.join(path)}; expected a paxlike Llama of {cfg}")
      node = node[key]
    value = np.asarray(node, np.float32)
    if value.shape != shape:
      raise ValueError(f"params {'/'.join(path)} has shape {list(value.shape)}, the config "
                       f"implies {list(shape)}")
    value = value.reshape(hf_shape[::-1]).T if _transposed(name) else value
    out[name] = np.ascontiguousarray(value)
  return out


def _paths(tree: Mapping[str, Any], prefix: str = "") -> list[str]:
  return [p for k, v in tree.items()
          for p in (_paths(v, f"{prefix}{k}/") if isinstance(v, Mapping) else [prefix + k])]

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


def _layer(i: int) -> str:
  return f"model.layers.{i}."


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Every tensor name a Hugging Face checkpoint of `cfg` has, with its shape."""
  e, h, kvh, d, m = (cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim,
                     cfg.mlp_dim)
  shapes = {"model.embed_tokens.weight": (cfg.vocab_size, e), "model.norm.weight": (e,)}
  for i in range(cfg.num_layers):
    p = _layer(i)
    shapes.update({
        p + "self_attn.q_proj.weight": (h * d, e), p + "self_attn.k_proj.weight": (kvh * d, e),
        p + "self_attn.v_proj.weight": (kvh * d, e), p + "self_attn.o_proj.weight": (e, h * d),
        p + "mlp.gate_proj.weight": (m, e), p + "mlp.up_proj.weight": (m, e),
        p + "mlp.down_proj.weight": (e, m), p + "input_layernorm.weight": (e,),
        p + "post_attention_layernorm.weight": (e,)})
  if not cfg.tie_embeddings:
    shapes["lm_head.weight"] = (cfg.vocab_size, e)
  return shapes


def unused_names(cfg: ModelConfig, names) -> list[str]:
  """Tensor names of a checkpoint that `cfg` has no place for (a tied checkpoint's lm_head copy
  and rotary buffers are expected and not listed)."""
  expected = set(hf_shapes(cfg)) | {"lm_head.weight"}
  return sorted(n for n in names if n not in expected and not n.endswith(_SKIPPED_SUFFIXES))


def params_from_hf(cfg: ModelConfig, tensors: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """paxlike float32 params of `cfg` from Hugging Face tensors (shapes as `hf_shapes`)."""
  e, h, kvh, d = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
  get = lambda name: np.asarray(tensors[name], np.float32)
  params: dict[str, Any] = {"embed": {"embedding": get("model.embed_tokens.weight")},
                            "final_norm": {"scale": get("model.norm.weight")}}
  for i in range(cfg.num_layers):
    p = _layer(i)
    params[f"blocks_{i}"] = {
        "attention": {
            "query": {"kernel": get(p + "self_attn.q_proj.weight").T.reshape(e, h, d)},
            "key": {"kernel": get(p + "self_attn.k_proj.weight").T.reshape(e, kvh, d)},
            "value": {"kernel": get(p + "self_attn.v_proj.weight").T.reshape(e, kvh, d)},
            "out": {"kernel": get(p + "self_attn.o_proj.weight").T.reshape(h, d, e)}},
        "attention_norm": {"scale": get(p + "input_layernorm.weight")},
        "mlp": {"gate": {"kernel": get(p + "mlp.gate_proj.weight").T},
                "up": {"kernel": get(p + "mlp.up_proj.weight").T},
                "down": {"kernel": get(p + "mlp.down_proj.weight").T}},
        "mlp_norm": {"scale": get(p + "post_attention_layernorm.weight")}}
  if not cfg.tie_embeddings:
    params["head"] = {"kernel": get("lm_head.weight").T}
  return _contiguous(params)


def params_to_hf(cfg: ModelConfig, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Hugging Face float32 tensors (contiguous numpy) of paxlike `params` of `cfg`."""
  e, h, d = cfg.d_model, cfg.num_heads, cfg.resolved_head_dim
  get = lambda *path: _lookup(params, path)
  out = {"model.embed_tokens.weight": get("embed", "embedding"),
         "model.norm.weight": get("final_norm", "scale")}
  for i in range(cfg.num_layers):
    p, b = _layer(i), f"blocks_{i}"
    kv = cfg.num_kv_heads * d
    out.update({
        p + "self_attn.q_proj.weight": get(b, "attention", "query", "kernel").reshape(e, h * d).T,
        p + "self_attn.k_proj.weight": get(b, "attention", "key", "kernel").reshape(e, kv).T,
        p + "self_attn.v_proj.weight": get(b, "attention", "value", "kernel").reshape(e, kv).T,
        p + "self_attn.o_proj.weight": get(b, "attention", "out", "kernel").reshape(h * d, e).T,
        p + "mlp.gate_proj.weight": get(b, "mlp", "gate", "kernel").T,
        p + "mlp.up_proj.weight": get(b, "mlp", "up", "kernel").T,
        p + "mlp.down_proj.weight": get(b, "mlp", "down", "kernel").T,
        p + "input_layernorm.weight": get(b, "attention_norm", "scale"),
        p + "post_attention_layernorm.weight": get(b, "mlp_norm", "scale")})
  if not cfg.tie_embeddings:
    out["lm_head.weight"] = get("head", "kernel").T
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def _lookup(params: Mapping[str, Any], path: tuple[str, ...]) -> np.ndarray:
  node: Any = params
  for key in path:
    if key not in node:
      raise ValueError(f"params have no {'/'.join(path)}; expected a paxlike Llama parameter tree")
    node = node[key]
  return np.asarray(node, np.float32)


def _contiguous(tree: dict[str, Any]) -> dict[str, Any]:
  """Nested dict of contiguous float32 numpy arrays (transposes become real copies)."""
  return {k: _contiguous(v) if isinstance(v, dict) else np.ascontiguousarray(v, np.float32)
          for k, v in tree.items()}

"""Hugging Face Llama checkpoint directories in and out of paxlike.

A directory holds `config.json`, the weights as `model.safetensors` or as shards listed in
`model.safetensors.index.json`, and optionally `tokenizer.json`. Nothing is unpickled and no code
from the directory runs: pickle-only weights (`pytorch_model.bin`) are refused.

  config, params = load_hf("llama-dir", mesh)  # params placed with the logical shardings
  save_hf("out-dir", config, params)           # loadable by LlamaForCausalLM.from_pretrained

The name and layout mapping lives in `models.hf_llama`; this module does the file I/O, the
checks that name the offending file, the sharded placement, and the text codec (an HF
`tokenizer.json` when the directory has one, else paxlike's byte tokenizer).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from models import hf_llama
from models.causal_lm import CausalLM
from models.config import ModelConfig
from parallelism import rules
from paxlike import tokenizer as byte_tokenizer
from paxlike.errors import UserError

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
TOKENIZER = "tokenizer.json"
_PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "generation_config.json")


def read_config(directory: str | Path) -> dict[str, Any]:
  """The directory's `config.json` as a dict; UserError naming the file if absent or not JSON."""
  path = Path(directory) / CONFIG
  if not path.is_file():
    raise UserError(f"{path} does not exist; a Hugging Face checkpoint directory needs config.json")
  try:
    data = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UserError(f"{path} is not valid JSON ({e})") from None
  if not isinstance(data, dict):
    raise UserError(f"{path} holds {type(data).__name__}, expected a JSON object")
  return data


def model_config(directory: str | Path, base: ModelConfig = ModelConfig()) -> ModelConfig:
  """`base` with the shape fields (`models.hf_llama.SHAPE_FIELDS`) of the directory's model."""
  path = Path(directory) / CONFIG
  try:
    return hf_llama.model_config(read_config(directory), base)
  except (KeyError, TypeError) as e:
    raise UserError(f"{path} lacks a usable field {e}; a Llama config.json has hidden_size, "
                    "intermediate_size, num_hidden_layers, num_attention_heads, vocab_size") from None
  except ValueError as e:
    raise UserError(f"{path}: {e}") from None


def resolve_model(model: ModelConfig, explicit: Sequence[str] = ()) -> ModelConfig:
  """`model` with its shape fields taken from `model.init_from`'s config.json (if set).

  explicit: field names the user set (e.g. by --set); one that disagrees with config.json is an
  error listing every such field, rather than silently replaced.
  """
  if not model.init_from:
    return model
  derived = model_config(model.init_from, model)
  clashes = [f"model.{name}={getattr(model, name)!r} (config.json: {getattr(derived, name)!r})"
             for name in hf_llama.SHAPE_FIELDS
             if name in explicit and getattr(model, name) != getattr(derived, name)]
  if clashes:
    raise UserError(f"model.init_from={model.init_from!r} fixes the model's shape; these settings "
                    f"disagree with {Path(model.init_from) / CONFIG}: {'; '.join(clashes)}; "
                    "drop them")
  return derived


def weight_files(directory: str | Path) -> dict[str, Path]:
  """{tensor name: safetensors file} of a checkpoint directory, single file or sharded.

  Raises UserError naming the file for a missing shard, an unreadable index, pickle-only
  weights or no weights at all.
  """
  directory = Path(directory)
  index = directory / INDEX
  if index.is_file():
    try:
      weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise UserError(f"{index} is not a safetensors index (needs a 'weight_map'): {e}") from None
    missing = sorted({f for f in weight_map.values() if not (directory / f).is_file()})
    if missing:
      raise UserError(f"{index} lists shard(s) that are missing: "
                      f"{', '.join(str(directory / f) for f in missing)}")
    return {name: directory / f for name, f in weight_map.items()}
  files = [directory / SINGLE] if (directory / SINGLE).is_file() else sorted(
      directory.glob("*.safetensors"))
  if len(files) == 1:
    return {name: files[0] for name in _header(files[0])}
  if len(files) > 1:
    raise UserError(f"{directory} has {len(files)} .safetensors files but no {INDEX}; "
                    "add the index that maps tensor names to shards")
  pickles = sorted(p.name for pattern in _PICKLE_PATTERNS for p in directory.glob(pattern))
  if pickles:
    raise UserError(f"{directory / pickles[0]} holds pickled weights, which paxlike does not load "
                    "(unpickling can run arbitrary code); convert them to safetensors, e.g. "
                    "LlamaForCausalLM.from_pretrained(dir).save_pretrained(dir, "
                    "safe_serialization=True)")
  raise UserError(f"{directory} has no weights: expected {SINGLE} or {INDEX} with its shards")


def _header(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
  """{tensor name: (shape, dtype)} from a safetensors file's header, without reading the data."""
  from safetensors import safe_open
  try:
    with safe_open(str(path), framework="flax") as f:
      return {name: (tuple(f.get_slice(name).get_shape()), f.get_slice(name).get_dtype())
              for name in f.keys()}
  except Exception as e:  # safetensors raises its own error types for a corrupt header
    raise UserError(f"{path} is not a readable safetensors file ({e})") from None


def read_params(directory: str | Path, config: ModelConfig) -> dict[str, Any]:
  """Host (numpy float32) paxlike params of `config` from the directory's safetensors files.

  Checks every tensor's presence and shape first; errors name the tensor and its file.
  """
  from safetensors import safe_open
  files = weight_files(directory)
  expected = hf_llama.hf_shapes(config)
  missing = [n for n in expected if n not in files]
  if missing:
    raise UserError(f"the checkpoint in {directory} lacks {len(missing)} tensor(s) a "
                    f"{config.num_layers}-layer Llama needs, e.g. {', '.join(missing[:3])}")
  unused = hf_llama.unused_names(config, files)
  if unused:
    raise UserError(f"{files[unused[0]]} holds tensors paxlike's Llama has no place for: "
                    f"{', '.join(unused[:3])}; is {Path(directory) / CONFIG} the right config?")
  tensors = {}
  for file in sorted(set(files.values())):
    header = _header(file)
    with safe_open(str(file), framework="flax") as f:
      for name in (n for n in expected if files[n] == file):
        shape = header[name][0]
        if shape != expected[name]:
          raise UserError(f"{file}: tensor {name} has shape {list(shape)} but "
                          f"{Path(directory) / CONFIG} implies {list(expected[name])}")
        tensors[name] = np.asarray(f.get_tensor(name), np.float32)
  return hf_llama.params_from_hf(config, tensors)


def place(params: Any, config: ModelConfig, mesh: Mesh | None = None) -> Any:
  """Device arrays of host `params`: on the default device, or on `mesh` with the logical
  shardings of `parallelism.rules` (what the trainer uses)."""
  if mesh is None:
    return jax.tree.map(jnp.asarray, params)
  module = CausalLM(config).module
  with rules.activate(mesh):
    boxed = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    try:
      rules.check_divisible(boxed, mesh)
    except ValueError as e:
      raise UserError(str(e)) from None
    shardings = rules.logical_shardings(boxed, mesh)
  return jax.tree.map(jax.device_put, params, shardings)


def load_hf(directory: str | Path, mesh: Mesh | None = None,
            base: ModelConfig = ModelConfig()) -> tuple[ModelConfig, Any]:
  """(ModelConfig, float32 params) of a Hugging Face Llama directory, placed on `mesh` if given.

  The config is `base` (max_len, dtype, attention) with the directory's shape fields and
  `init_from` set to the directory.
  """
  config = dataclasses.replace(model_config(directory, base), init_from=str(directory))
  return config, place(read_params(directory, config), config, mesh)


def save_hf(directory: str | Path, config: ModelConfig, params: Any,
            token_ids: Mapping[str, int] | None = None) -> Path:
  """Writes `config.json` and `model.safetensors` (float32) for transformers' LlamaForCausalLM.

  token_ids: bos_token_id / eos_token_id / pad_token_id for config.json; default: those of
  `config.init_from`'s config.json with its tokenizer files copied along, else the byte
  tokenizer's. Returns the directory.
  """
  from safetensors.numpy import save_file
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  source = Path(config.init_from) if config.init_from else None
  if token_ids is None:
    token_ids = _token_ids(source)
  host = jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), params)
  tensors = hf_llama.params_to_hf(config, host)
  save_file(tensors, str(directory / SINGLE), metadata={"format": "pt"})
  (directory / CONFIG).write_text(json.dumps(hf_llama.hf_config(config, token_ids), indent=2)
                                  + "\n")
  if source is not None:
    for name in _TOKENIZER_FILES:
      if (source / name).is_file() and (source / name).resolve() != (directory / name).resolve():
        shutil.copyfile(source / name, directory / name)
  return directory


def _token_ids(source: Path | None) -> dict[str, int]:
  if source is None:
    return {"bos_token_id": byte_tokenizer.EOS_ID, "eos_token_id": byte_tokenizer.EOS_ID,
            "pad_token_id": byte_tokenizer.PAD_ID}
  hf = read_config(source)
  return {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
          if isinstance(hf.get(k), int)}


# ----------------------------------------------------------------------------- text


@dataclasses.dataclass(frozen=True)
class TextCodec:
  """Text <-> token ids for prompts and samples.

  Attributes:
    encode: text -> [N] int32 ids (no special tokens).
    decode: ids -> text (special tokens dropped).
    start_id: the id every prompt starts with (bos; the byte tokenizer uses eos, which
      separates documents in its training stream).
    eos_id: generation stops here.
    pad_id: fills rows past their length.
    name: for messages.
  """

  encode: Callable[[str], np.ndarray]
  decode: Callable[[Sequence[int]], str]
  start_id: int
  eos_id: int
  pad_id: int
  name: str


BYTES = TextCodec(byte_tokenizer.encode, byte_tokenizer.decode, byte_tokenizer.EOS_ID,
                  byte_tokenizer.EOS_ID, byte_tokenizer.PAD_ID, "bytes")


@functools.lru_cache(maxsize=8)
def text_codec(model: ModelConfig) -> TextCodec:
  """The codec of a model: `init_from`'s tokenizer.json if it has one, else the byte tokenizer.

  An imported model without tokenizer.json gets the byte tokenizer only if its vocabulary holds
  the 260 byte-tokenizer ids; otherwise it is refused.
  """
  if not model.init_from:
    return BYTES
  source = Path(model.init_from)
  if not (source / TOKENIZER).is_file():
    if model.vocab_size < byte_tokenizer.VOCAB_SIZE:
      raise UserError(f"{source / TOKENIZER} is missing and model.vocab_size={model.vocab_size} "
                      f"is too small for the byte tokenizer ({byte_tokenizer.VOCAB_SIZE} ids); "
                      "add the model's tokenizer.json")
    return BYTES
  from tokenizers import Tokenizer
  try:
    hf_tokenizer = Tokenizer.from_file(str(source / TOKENIZER))
  except Exception as e:  # tokenizers raises a bare Exception subclass for a malformed file
    raise UserError(f"{source / TOKENIZER} is not a readable tokenizer ({e})") from None
  ids = _token_ids(source)
  if "eos_token_id" not in ids:
    raise UserError(f"{source / CONFIG} has no integer eos_token_id; generation needs one")
  eos = ids["eos_token_id"]
  return TextCodec(
      encode=lambda text: np.asarray(hf_tokenizer.encode(text, add_special_tokens=False).ids,
                                     np.int32),
      decode=lambda ids_: hf_tokenizer.decode([int(i) for i in ids_], skip_special_tokens=True),
      start_id=ids.get("bos_token_id", eos), eos_id=eos, pad_id=ids.get("pad_token_id", eos),
      name=str(source / TOKENIZER))

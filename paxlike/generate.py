"""Text in, text out: encode prompts, run a compiled sampler, decode, and measure it.

Prompts start with the eos id (the training stream separates documents with eos, so eos means
"start of a document"; a model imported from Hugging Face uses its bos id and tokenizer.json, see
`interchange.text_codec`), are right-padded into one batch and decoded by the sampler named by
`sampler.kind`, through its spec in `samplers.registry`. The diffusion-style kinds
(`SamplerSpec.takes_canvas`) fill a canvas of the prompt and max_new_tokens masks instead; their text ends
at the first eos they produced.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from paxlike import interchange, parallel_sampling, timing
from paxlike.config import SamplerConfig
from paxlike.errors import UserError
from samplers import ar, registry
from samplers.core import canvas
from samplers.spec import Decode, SamplerSpec



def encode_prompts(prompts: list[str], max_len: int,
                   codec: interchange.TextCodec = interchange.BYTES) -> tuple[np.ndarray, np.ndarray]:
  """Right-padded [B, P] int32 prompt ids (the codec's start id first) and their lengths [B]."""
  encoded = [np.concatenate([[codec.start_id], codec.encode(p)]) for p in prompts]
  for i, ids in enumerate(encoded):
    if len(ids) >= max_len:
      raise UserError(
          f"prompt {i} is {len(ids)} tokens long (with its start token) but model.max_len is "
          f"{max_len}; shorten the prompt to at most {max_len - 2} bytes")
  return ar.pad_prompts(encoded, codec.pad_id)


# What each kind of first model a sampler takes is, for error messages (`SamplerSpec.model`).
_MODEL_NAMES = {"causal": "a causal model", "denoiser": "a masked-diffusion model (model.kind=mdlm)",
                "any_subset": "an any-subset AR model (model.kind=asarm)",
                "finality": "a denoiser with a finality head (model.kind=learn2pd)",
                "medusa": "a causal model with Medusa heads (model.draft_heads.medusa=K)",
                "eagle": "a causal model with an EAGLE draft head (model.draft_heads.eagle=true)"}
# A model of the key's kind also serves samplers that take the value's.
_ALSO = {"finality": "denoiser", "medusa": "causal", "eagle": "causal"}


def _model_kind(model) -> str:
  """Which of `spec.MODEL_KINDS` `model` is (a finality denoiser is also a denoiser, a model
  with Medusa heads or an EAGLE head also a causal model)."""
  if getattr(model, "num_medusa_heads", 0):
    return "medusa"
  if getattr(model, "has_eagle_head", False):
    return "eagle"
  if hasattr(model, "denoise_with_finality"):
    return "finality"
  if hasattr(model, "denoise"):
    return "denoiser"
  return "any_subset" if hasattr(model, "conditionals") else "causal"


def _check_model_kind(spec: SamplerSpec, model) -> None:
  """UserError when the sampler kind does not fit the model."""
  have = _model_kind(model)
  if spec.model in (have, _ALSO.get(have)):
    return
  fitting = [kind for kind, s in registry.SPECS.items() if s.model in (have, _ALSO.get(have))]
  raise UserError(f"sampler.kind={spec.kind} needs {_MODEL_NAMES[spec.model]}; this run's model "
                  f"is {_MODEL_NAMES[have]}: use sampler.kind={', '.join(fitting)}")


def _sampler(cfg: SamplerConfig, max_new: int, model, params, draft, draft_params):
  """(jitted sample function, its leading arguments, its static config) for `cfg.kind`."""
  spec = cfg.spec
  codec = interchange.text_codec(model.config)  # eos and pad of the model's tokenizer
  decode = Decode(max_new_tokens=max_new, eos_id=codec.eos_id, pad_id=codec.pad_id,
                  sampling=cfg.sampling())
  config = spec.build(cfg.options(), decode)
  if not spec.second_model:
    return spec.sample, (model, params), config
  if draft is None:
    raise UserError(f"sampler.kind={cfg.kind} needs a second model (the {spec.second_model} model): "
                    f"--set sampler.draft_workdir=DIR (a trained run of "
                    f"{_MODEL_NAMES[spec.second_kind]} with the same vocabulary)")
  if spec.second_kind not in (_model_kind(draft), _ALSO.get(_model_kind(draft))):
    raise UserError(f"sampler.kind={cfg.kind} needs {_MODEL_NAMES[spec.second_kind]} as its "
                    f"{spec.second_model} model (sampler.draft_workdir); that run's model is "
                    f"{_MODEL_NAMES[_model_kind(draft)]}")
  pair = (draft, draft_params, model, params) if spec.second_first else (
      model, params, draft, draft_params)
  return spec.sample, pair, config


class CompiledDecoder:
  """A sampler compiled ahead of time for one batch of prompts: `run()` decodes it once and
  blocks until done; `result(out, wall_s)` turns one run's output into (tokens, lengths, stats).
  Benchmarks that time several decoders interleaved hold one of these per decoder."""

  def __init__(self, model: Any, params: Any, prompt: np.ndarray, lengths: np.ndarray,
               cfg: SamplerConfig, draft: Any = None, draft_params: Any = None):
    fn, leading, config, max_new = _prepare(cfg, model, params, prompt, draft, draft_params)
    args = (*leading, *_data(cfg, model, prompt, lengths, max_new), jax.random.key(cfg.seed))
    start = time.perf_counter()
    try:
      self._compiled = fn.lower(*args, config).compile()
    except ValueError as e:  # the samplers' own checks (vocabularies, lengths, settings)
      raise UserError(str(e)) from None
    self.compile_s = time.perf_counter() - start
    self._dynamic = (*leading[1::2], *args[len(leading):])  # models (even places) are static
    self._cfg, self._model, self._lengths, self._max_new = cfg, model, lengths, max_new

  def hlo_text(self) -> str:
    """The compiled program's optimised HLO (for per-op profiles, `paxlike.bench.op_profile`)."""
    return self._compiled.as_text()

  def run(self) -> Any:
    """One decode of the batch (the sampler's output, ready)."""
    return jax.block_until_ready(self._compiled(*self._dynamic))

  def result(self, out: Any, wall_s: float) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(tokens [B, N], lengths [B], stats) of one run's output, timed at `wall_s` seconds."""
    tokens, counts = np.asarray(out.tokens), np.asarray(out.lengths)
    generated = int(counts.sum())
    if self._cfg.spec.takes_canvas:
      tokens, counts = _canvas_text(self._model, self._lengths, self._max_new)(tokens)
    stats = {"sampler": self._cfg.kind, "batch": len(self._lengths), "tokens": generated,
             "tokens_per_s": round(generated / wall_s, 1), "wall_s": round(wall_s, 4),
             "compile_s": round(self.compile_s, 3)}
    for name, value in out.stats.items():
      value = np.asarray(value)
      stats[name] = round(float(value), 4) if value.dtype.kind == "f" else int(value)
    return tokens, counts, stats


def _data(cfg: SamplerConfig, model, prompt: np.ndarray, lengths: np.ndarray,
          max_new: int) -> tuple[jax.Array, ...]:
  """The sampler's arguments between its models and its key: (prompt, lengths), or for the
  canvas kinds (canvas [B, P + max_new],) with max_new masks after each prompt."""
  if not cfg.spec.takes_canvas:
    return jnp.asarray(prompt), jnp.asarray(lengths)
  if np.any(prompt == model.mask_id):
    raise UserError(f"the prompts contain the mask id {model.mask_id}; a diffusion sampler "
                    "would generate there: remove it from the prompt")
  return (canvas.from_prompts(jnp.asarray(prompt), jnp.asarray(lengths), max_new, model.mask_id,
                              interchange.text_codec(model.config).pad_id),)


def _canvas_text(model, lengths: np.ndarray, max_new: int):
  """completed canvases [B, ..., L] (row b's after prompt b) -> (generated tokens [B, ..., N]
  cut after the first eos, their lengths [B, ...])."""
  codec = interchange.text_codec(model.config)

  def finish(canvases: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    shape = canvases.shape[:-1]
    rows = np.broadcast_to(np.reshape(lengths, (-1,) + (1,) * (len(shape) - 1)), shape)
    generated = canvas.generated(jnp.asarray(canvases).reshape(-1, canvases.shape[-1]),
                                 jnp.asarray(rows.reshape(-1)), max_new)
    tokens, counts = _until_eos(np.asarray(generated), codec)
    return tokens.reshape(shape + (max_new,)), counts.reshape(shape)

  return finish


def bounding_max_len(cfgs: list[SamplerConfig], model, draft) -> int:
  """The max_len that bounds prompt + generation for every sampler of `cfgs`: the model's, and
  the second model's where a sampler takes it and reads more than a window of the row
  (`SamplerSpec.windowed_second`)."""
  bounded = draft is not None and any(
      cfg.spec.second_model and not cfg.spec.windowed_second(cfg.options()) for cfg in cfgs)
  return min(model.max_len, draft.max_len) if bounded else model.max_len


def _prepare(cfg: SamplerConfig, model, params, prompt: np.ndarray, draft, draft_params):
  """(sample function, leading arguments, static config, tokens to generate) for `cfg`, after
  checking that the prompts leave room and the sampler fits the model."""
  max_len = bounding_max_len([cfg], model, draft)
  spec, options = cfg.spec, cfg.options()
  try:
    room = max_len - prompt.shape[1] - spec.slack(options)
  except ValueError as e:
    raise UserError(f"sampler.kind={cfg.kind}: {e}") from None
  max_new = spec.fit(options, prompt.shape[1], min(cfg.max_new_tokens, room))
  if max_new < 1:
    raise UserError(f"the prompts ({prompt.shape[1]} tokens) leave no room to generate within "
                    f"model.max_len={max_len}")
  _check_model_kind(spec, model)
  try:
    return (*_sampler(cfg, max_new, model, params, draft, draft_params), max_new)
  except ValueError as e:  # the samplers' own checks (vocabularies, lengths, settings)
    raise UserError(str(e)) from None


def decode(model: Any, params: Any, prompt: np.ndarray, lengths: np.ndarray, cfg: SamplerConfig,
           draft: Any = None, draft_params: Any = None,
           repeats: int = 1) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
  """Runs the sampler of `cfg.kind` on token prompts; returns (tokens [B, N], lengths [B], stats).

  The sampler is compiled ahead of time (`compile_s`); `wall_s` is the median of `repeats` runs.
  With `sampler.num_samples` > 1 or a selection, `parallel_sampling.decode` draws the n samples
  (the canvas kinds: selection none, majority or mbr).
  """
  if cfg.num_samples > 1 or cfg.selection != "none":
    parallel_sampling.check_selection(cfg)
    fn, leading, config, max_new = _prepare(cfg, model, params, prompt, draft, draft_params)
    finish = _canvas_text(model, lengths, max_new) if cfg.spec.takes_canvas else None
    return parallel_sampling.decode(fn, leading, config, prompt, lengths, cfg, model, params,
                                    data=_data(cfg, model, prompt, lengths, max_new),
                                    finish=finish)
  decoder = CompiledDecoder(model, params, prompt, lengths, cfg, draft, draft_params)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    out = decoder.run()
    times.append(time.perf_counter() - start)
  return decoder.result(out, sorted(times)[len(times) // 2])


def _until_eos(tokens: np.ndarray,
               codec: interchange.TextCodec) -> tuple[np.ndarray, np.ndarray]:
  """Generated tokens [B, N] cut after each row's first eos (pad after it) and their lengths."""
  eos = tokens == codec.eos_id
  counts = np.where(eos.any(axis=1), eos.argmax(axis=1) + 1, tokens.shape[1]).astype(np.int32)
  keep = np.arange(tokens.shape[1])[None, :] < counts[:, None]
  return np.where(keep, tokens, codec.pad_id), counts


def generate(model: Any, params: Any, prompts: list[str], cfg: SamplerConfig, draft: Any = None,
             draft_params: Any = None) -> tuple[list[str], dict[str, Any]]:
  """Continuations of `prompts` and statistics (tokens, tokens/s, model calls, acceptance, times).

  Generation stops at eos or at `cfg.max_new_tokens`, shortened so prompt + generation (+ the
  draft window) fits in the models' max_len.
  """
  max_len = bounding_max_len([cfg], model, draft)
  codec = interchange.text_codec(model.config)
  prompt, lengths = encode_prompts(prompts, max_len, codec)
  tokens, counts, stats = decode(model, params, prompt, lengths, cfg, draft, draft_params)
  texts = [codec.decode(tokens[i, :counts[i]]) for i in range(len(tokens))]
  return texts, stats


def side_by_side(model: Any, params: Any, prompts: list[str], cfgs: list[SamplerConfig],
                 draft: Any = None, draft_params: Any = None,
                 repeats: int = 9) -> list[tuple[list[str], dict[str, Any]]]:
  """Several samplers on the same prompts, timed fairly: each compiled ahead of time and warmed
  up, then `repeats` rounds that run every sampler once, back to back. Each sampler's `wall_s` is
  the median of its runs and `speedup_vs_first` the median over the rounds of the first
  sampler's time over its own (the rounds share the machine's state, so the ratio is steady
  under background load). Returns (texts, stats) per sampler, in the order of `cfgs`."""
  max_len = bounding_max_len(cfgs, model, draft)
  codec = interchange.text_codec(model.config)
  prompt, lengths = encode_prompts(prompts, max_len, codec)
  decoders = [CompiledDecoder(model, params, prompt, lengths, cfg,
                              *((draft, draft_params) if cfg.spec.second_model else ()))
              for cfg in cfgs]
  outs = [decoder.run() for decoder in decoders]
  times, _ = timing.interleaved_times([decoder.run for decoder in decoders], repeats)
  results = []
  for decoder, out, own in zip(decoders, outs, times):
    tokens, counts, stats = decoder.result(out, statistics.median(own))
    stats["speedup_vs_first"] = round(statistics.median(
        [first / mine for first, mine in zip(times[0], own)]), 3)
    texts = [codec.decode(tokens[i, :counts[i]]) for i in range(len(tokens))]
    results.append((texts, stats))
  return results

"""Every sampler kind of the registry, on small Llama-family models built for its model kind:

- on 8 simulated devices as data x fsdp x tensor (2 x 2 x 2: batch rows, parameter shards and
  attention heads all split), with parameters placed by the project's sharding rules and prompts
  (or canvases) sharded over the batch axes, it decodes the same tokens as on one device, and its
  output stays sharded over the batch axes;
- sampled, a row decoded alone (its own prompt width, its own key) equals the same row in a
  batch of ragged prompts, for every kind: none of them lets a row depend on its neighbours;
- repeated sampling wraps a causal and a canvas kind on the mesh as well.

A kind added to `samplers.registry` is covered here without an edit, as long as its defaults
decode (its `options()` defaults, `MAX_NEW` tokens).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.build import build_model
from models.config import DiffusionConfig, DraftHeadsConfig, ModelConfig
from parallelism import rules
from parallelism.mesh import make_mesh
from samplers import ar, registry, repeated
from samplers.core import canvas
from samplers.core.logits import SamplingParams
from samplers.spec import Decode
from tests.models.random_params import random_params

MAX_NEW = 8
MASK_ID, PAD_ID = 31, 0
_SHAPE = dict(vocab_size=32, d_model=32, num_heads=4, num_kv_heads=2, mlp_dim=64, max_len=40,
              init_std=0.5, tie_embeddings=False)
# Each model kind a sampler can take; "block" decodes with the cache, so its denoiser is
# block-causal with the sampler's block length.
_CONFIGS = {
    "causal": ModelConfig(num_layers=1, **_SHAPE),
    "second": ModelConfig(num_layers=1, **_SHAPE),
    "denoiser": ModelConfig(kind="mdlm", num_layers=1, diffusion=DiffusionConfig(mask_id=MASK_ID),
                            **_SHAPE),
    "block": ModelConfig(kind="mdlm", num_layers=1, **_SHAPE,
                         diffusion=DiffusionConfig(mask_id=MASK_ID, block_size=2)),
    "any_subset": ModelConfig(kind="asarm", num_layers=1, **_SHAPE,
                              diffusion=DiffusionConfig(mask_id=MASK_ID)),
    "finality": ModelConfig(kind="learn2pd", num_layers=1, **_SHAPE,
                            diffusion=DiffusionConfig(mask_id=MASK_ID)),
    "medusa": ModelConfig(num_layers=1, draft_heads=DraftHeadsConfig(medusa=2), **_SHAPE),
    "eagle": ModelConfig(num_layers=1, draft_heads=DraftHeadsConfig(eagle=True), **_SHAPE),
}
# One mesh with every axis a decode shards over: a mesh per axis pair compiled every kind twice
# (a minute of the suite) without covering more.
MESH = dict(data=2, fsdp=2, tensor=2)
PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [3, 3, 3, 1], [9], [10, 11, 12], [4, 4],
           [20, 21, 22, 23, 24, 25], [30]]
SAMPLED = SamplingParams(temperature=1.0)
GREEDY_ONLY = {"jacobi"}
# Settings other than the defaults, for MAX_NEW tokens after prompts of up to 6 (canvas width 14).
# The drafted kinds draft little (2 tokens, small trees): their draft loops are unrolled, so
# their programs, and compile times, grow with the draft length.
OPTIONS = {"mdlm": {"steps": 4}, "edlm": {"steps": 4}, "block": {"block_length": 2},
           "speculative": {"num_draft_tokens": 2},
           "diffusion_drafted": {"num_draft_tokens": 2}, "apd": {"num_draft_tokens": 2},
           "adaptive": {"num_draft_tokens": 2},
           "spectr": {"num_draft_tokens": 2}, "tree": {"branching": (2, 1)},
           "medusa": {"branching": (2, 1)}, "eagle": {"num_draft_tokens": 2},
           "dynamic_tree": {"node_budget": 4, "max_depth": 2}}  # kinds that refuse to sample; they decode greedily here
KEYS = jax.random.split(jax.random.key(3), len(PROMPTS))  # one key per row


@functools.cache
def _model(name: str):
  """(model, numpy-drawn params) of `_CONFIGS[name]`."""
  model = build_model(_CONFIGS[name])
  return model, random_params(model, seed=list(_CONFIGS).index(name))


def _models(kind: str) -> tuple:
  """The (model, params, ...) arguments `kind`'s sample function takes, in its order."""
  spec = registry.get(kind)
  first = _model("block" if kind == "block" else spec.model)
  if not spec.second_model:
    return first
  second = _model("second" if spec.second_kind == "causal" else spec.second_kind)
  return (*second, *first) if spec.second_first else (*first, *second)


def _config(kind: str):
  spec = registry.get(kind)
  sampling = SamplingParams(temperature=0.0) if kind in GREEDY_ONLY else SAMPLED
  return spec.build(spec.options(**OPTIONS.get(kind, {})),
                    Decode(max_new_tokens=MAX_NEW, eos_id=None, pad_id=PAD_ID, sampling=sampling))


def _data(kind: str, prompts) -> tuple[jax.Array, ...]:
  """(prompt [B, P], lengths [B]) for the causal kinds, (canvas [B, P + MAX_NEW],) otherwise."""
  prompt, lengths = (jnp.asarray(x) for x in ar.pad_prompts(prompts, PAD_ID))
  if not registry.get(kind).takes_canvas:
    return prompt, lengths
  return (canvas.from_prompts(prompt, lengths, MAX_NEW, MASK_ID, PAD_ID),)


def _sample(kind: str, models: tuple, data: tuple, key: jax.Array):
  return registry.get(kind).sample(*models, *data, key, _config(kind))


@functools.cache
def _on_one_device(kind: str):
  """The batch of PROMPTS decoded on one device with the row keys KEYS."""
  return _sample(kind, _models(kind), _data(kind, PROMPTS), KEYS)


def _place(kind: str, mesh) -> tuple:
  """`kind`'s models with their parameters sharded by the project's logical rules on `mesh`."""
  placed = list(_models(kind))
  for i in range(0, len(placed), 2):
    model = placed[i]
    boxed = jax.eval_shape(model.module.init, jax.random.key(0),
                           jnp.zeros((1, model.max_len), jnp.int32))["params"]
    placed[i + 1] = jax.device_put(placed[i + 1], rules.logical_shardings(boxed, mesh))
  return tuple(placed)


@pytest.mark.parametrize("kind", registry.KINDS)
def test_decodes_the_same_tokens_on_a_mesh_as_on_one_device(kind):
  """Sampled at temperature 1 with a key per row: the tokens on the mesh equal one device's (the
  random streams are per row and partitionable), and the output is sharded over the batch."""
  expected = _on_one_device(kind)
  mesh = make_mesh(**MESH)
  with rules.activate(mesh):
    placed = [jax.device_put(x, rules.batch_sharding(mesh, x.ndim))
              for x in _data(kind, PROMPTS)]
    out = _sample(kind, _place(kind, mesh), placed, KEYS)
  np.testing.assert_array_equal(out.tokens, expected.tokens)
  np.testing.assert_array_equal(out.lengths, expected.lengths)
  assert out.tokens.sharding.is_equivalent_to(rules.batch_sharding(mesh, out.tokens.ndim),
                                              out.tokens.ndim), out.tokens.sharding


@pytest.mark.parametrize("kind", registry.KINDS)
def test_a_row_alone_equals_the_same_row_in_a_batch(kind):
  """Row 3 decoded alone with its row key gives the tokens it gets among the 8 ragged prompts.
  A causal kind gets the row's own prompt (1 token; the batch's width is 6). A canvas kind gets
  the row's canvas as it is in the batch: a bidirectional denoiser sees the padding after a
  short prompt, which is the model's dependence on the canvas, not the sampler's on the batch."""
  batch, row = _on_one_device(kind), 3
  if registry.get(kind).takes_canvas:
    data = tuple(x[row:row + 1] for x in _data(kind, PROMPTS))
  else:
    data = _data(kind, [PROMPTS[row]])
  alone = _sample(kind, _models(kind), data, KEYS[row:row + 1])
  np.testing.assert_array_equal(alone.tokens[0], batch.tokens[row])
  np.testing.assert_array_equal(alone.lengths[0], batch.lengths[row])


@pytest.mark.parametrize("kind", ["ar", "unmask"])
def test_repeated_sampling_on_a_mesh_equals_one_device(kind):
  """n = 3 samples per row, vmapped, on the mesh: the same samples as on one device."""
  spec, data, key = registry.get(kind), _data(kind, PROMPTS), jax.random.key(11)
  models = _models(kind)
  run = lambda m, d: repeated.sample(spec.sample, m[0::2], m[1::2], *d, key, _config(kind), 3)
  expected = run(models, data)
  mesh = make_mesh(**MESH)
  with rules.activate(mesh):
    out = run(_place(kind, mesh), [jax.device_put(x, rules.batch_sharding(mesh, x.ndim))
                                   for x in data])
  np.testing.assert_array_equal(out.tokens, expected.tokens)
  assert out.tokens.sharding.is_equivalent_to(rules.batch_sharding(mesh, out.tokens.ndim),
                                              out.tokens.ndim), out.tokens.sharding

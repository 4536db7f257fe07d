"""ParScale (models/parscale.py): reduction to the base model, cached decode, samplers, training."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import parscale
from models.build import build_model
from models.causal_lm import CausalLM
from models.config import ModelConfig, ParScaleConfig
from paxlike import config as config_lib
from paxlike import registry
from paxlike.metrics import read_metrics
from paxlike.run import Run
from paxlike.train import Trainer
from samplers import ar, jacobi, lookahead, prompt_lookup, tree
from samplers.core.logits import SamplingParams
from tests.models.random_params import random_params

LOGITS = jax.jit(CausalLM.logits, static_argnums=0)
LOSS = jax.jit(lambda model, params, batch: model.loss(params, batch, jax.random.key(0))[0],
               static_argnums=0)
GREEDY = SamplingParams(temperature=0.0)
SHAPE = dict(vocab_size=32, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, mlp_dim=64,
             max_len=40, init_std=0.5, tie_embeddings=False)
BASE = ModelConfig(**SHAPE)


def _parscale(streams, prefix_len=3, smoothing=0.01, **changes) -> ModelConfig:
  return dataclasses.replace(BASE, parscale=ParScaleConfig(streams=streams, prefix_len=prefix_len,
                                                           smoothing=smoothing), **changes)


def _tokens(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).integers(0, BASE.vocab_size, shape), jnp.int32)


def _close(actual, expected):
  """Equal up to float32 rounding relative to the logits' scale (init_std 0.5: logits ~ 10)."""
  np.testing.assert_allclose(actual, expected, atol=1e-5 * max(1.0, float(np.abs(expected).max())))


def _positions(start, steps):
  return jnp.asarray(start, jnp.int32)[:, None] + jnp.arange(steps, dtype=jnp.int32)


def _paths(tree_):
  return {"/".join(str(k.key) for k in path): leaf.shape
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree_)[0]}


def test_one_stream_without_prefix_is_the_base_model():
  """P = 1, M = 0 adds no parameter and computes the base model's logits and loss bit for bit."""
  base = build_model(BASE)
  same = build_model(dataclasses.replace(BASE, parscale=ParScaleConfig(streams=1, prefix_len=0,
                                                                      smoothing=0.5)))
  params = random_params(base)
  assert _paths(jax.eval_shape(same.init, jax.random.key(0))) == _paths(params)
  batch = _tokens(0, (2, 9))
  np.testing.assert_array_equal(LOGITS(same, params, batch[:, :-1]),
                                LOGITS(base, params, batch[:, :-1]))
  assert float(LOSS(same, params, batch)) == float(LOSS(base, params, batch))
  assert isinstance(same.init_cache(2), type(base.init_cache(2)))


def test_streams_with_equal_prefixes_aggregate_to_one_stream():
  """Equal prefixes make the P streams identical; weights summing to 1 then return that stream."""
  one, two = CausalLM(_parscale(1)), CausalLM(_parscale(2))
  params = random_params(two)
  shared = jax.tree_util.tree_map_with_path(
      lambda path, x: x[:1] if "prefix" in str(path) else x,
      {k: v for k, v in params.items() if k != "aggregator"})
  equal = jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.concatenate([x[:1]] * 2) if "prefix" in str(path) else x, params)
  tokens = _tokens(1, (2, 7))
  reference = LOGITS(one, shared, tokens)
  _close(LOGITS(two, equal, tokens), reference)
  assert np.abs(LOGITS(two, params, tokens) - reference).max() > 1e-2


def test_aggregator_matches_its_formula():
  """w = softmax(MLP(concat of the P states)), smoothed (1 - eps) w + eps / P, sum_j w_j h_j."""
  cfg = _parscale(3, smoothing=0.2)
  module = parscale.Aggregator(cfg)
  x = jax.random.normal(jax.random.key(0), (2 * 3, 4, cfg.d_model))  # 2 rows x 3 streams
  params = nn.meta.unbox(module.init(jax.random.key(1), x)["params"])
  out = np.asarray(module.apply({"params": params}, x))
  h = np.asarray(x).reshape(2, 3, 4, -1)
  for b in range(2):
    for t in range(4):
      concat = h[b, :, t].reshape(-1)  # [P * E], stream-major like the kernel
      hidden = concat @ np.asarray(params["hidden"]).reshape(-1, cfg.d_model)
      scores = (hidden / (1 + np.exp(-hidden))) @ np.asarray(params["out"])
      w = np.exp(scores - scores.max()) / np.exp(scores - scores.max()).sum()
      w = 0.8 * w + 0.2 / 3
      np.testing.assert_allclose(out[b, t], w @ h[b, :, t], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("streams", [2, 4])
def test_cached_decode_matches_full_forward(streams):
  """Prefill, single tokens and chunks through the per-stream caches equal one full forward; a
  per-row rollback re-feeds tokens as if the rolled-back ones had never been seen."""
  model = CausalLM(_parscale(streams))
  params = random_params(model)
  tokens = _tokens(2, (2, 12))
  expected = LOGITS(model, params, tokens)
  apply = jax.jit(CausalLM.apply, static_argnums=0)
  cache = model.init_cache(2, 16)
  assert len(cache.keys) == 2 and cache.keys[0].shape == (2, streams, 2, 16, 8)
  logits, cache = jax.jit(CausalLM.prefill, static_argnums=0)(
      model, params, tokens[:, :4], _positions([0, 0], 4), cache)
  chunks, start = [logits], 4
  for steps in (1, 1, 3, 3):
    logits, cache = apply(model, params, tokens[:, start:start + steps],
                          _positions([start, start], steps), cache)
    chunks.append(logits)
    start += steps
  np.testing.assert_array_equal(cache.lengths, [12, 12])
  _close(jnp.concatenate(chunks, axis=1), expected)

  back = np.array([3, 6])  # row 0 rolls back 3 tokens, row 1 six
  cache = cache.replace(lengths=cache.lengths - back)
  again = jnp.stack([tokens[0, 9:12], tokens[1, 6:9]])
  logits, cache = apply(model, params, again, _positions(12 - back, 3), cache)
  _close(logits[0], expected[0, 9:12])
  _close(logits[1], expected[1, 6:9])


PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [31]]
STEPS = 12


@pytest.fixture(scope="module")
def target():
  """A P = 2 target, its greedy AR continuation of PROMPTS, and its base model as a draft (the
  shared weights without prefixes and aggregator)."""
  model = CausalLM(_parscale(2))
  params = random_params(model)
  prompt, lengths = ar.pad_prompts(PROMPTS)
  out = ar.sample(model, params, prompt, lengths, jax.random.key(0),
                  ar.ARConfig(max_new_tokens=STEPS, sampling=GREEDY))
  draft = {name: ({**value, "attention": {k: v for k, v in value["attention"].items()
                                          if k != "prefix"}}
                  if name.startswith("blocks_") else value)
           for name, value in params.items() if name != "aggregator"}
  return model, params, np.asarray(out.tokens), CausalLM(BASE), draft


def _check_greedy(model, params, tokens):
  """Each generated token is the argmax of the full forward over prompt + tokens so far (one
  forward per row; a mismatch is allowed only at a near-tie, < 1e-4). Returns the tie count."""
  ties = 0
  for prompt, row in zip(PROMPTS, tokens):
    seq = np.concatenate([prompt, row])
    logits = np.asarray(LOGITS(model, params, jnp.asarray(seq[None])))[0]
    for t in range(len(prompt) - 1, len(seq) - 1):
      best = int(np.argmax(logits[t]))
      if best != seq[t + 1]:
        assert logits[t, best] - logits[t, seq[t + 1]] < 1e-4, (prompt, t)
        ties += 1
  return ties


def test_greedy_ar_is_the_argmax_of_the_full_forward(target):
  model, params, tokens, _, _ = target
  assert tokens.shape == (3, STEPS)
  assert _check_greedy(model, params, tokens) == 0


@pytest.mark.slow
def test_tree_jacobi_and_draft_free_decoders_equal_greedy_ar_with_a_parscale_target(target):
  """Token trees (tree mask, rollback, slot compaction of every stream's cache) with the base
  model as draft, Jacobi iteration, prompt lookup and lookahead reproduce greedy AR on the
  ParScale target."""
  model, params, expected, draft, draft_params = target
  prompt, lengths = ar.pad_prompts(PROMPTS)
  out = tree.sample(model, params, draft, draft_params, prompt, lengths, jax.random.key(0),
                    tree.TreeConfig(branching=(2, 2, 1), max_new_tokens=STEPS, sampling=GREEDY))
  np.testing.assert_array_equal(out.tokens, expected)
  assert 0 < float(out.stats["acceptance"]) and int(out.stats["target_calls"]) < STEPS
  out = jacobi.sample(model, params, prompt, lengths, jax.random.key(0),
                      jacobi.JacobiConfig(block_size=4, max_new_tokens=STEPS))
  np.testing.assert_array_equal(out.tokens, expected)
  # the draft-free kinds: copies from the row's text, and the lookahead tree (compacted caches)
  out = prompt_lookup.sample(model, params, prompt, lengths, jax.random.key(0),
                             prompt_lookup.PromptLookupConfig(3, STEPS, sampling=GREEDY))
  np.testing.assert_array_equal(out.tokens, expected)
  out = lookahead.sample(model, params, prompt, lengths, jax.random.key(0),
                         lookahead.LookaheadConfig(window=2, ngram=3, candidates=2,
                                                   max_new_tokens=STEPS, sampling=GREEDY))
  np.testing.assert_array_equal(out.tokens, expected)


def test_new_parameters_and_cache_carry_logical_axes():
  model = CausalLM(_parscale(2))
  boxed = jax.eval_shape(model.module.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
  specs = nn.get_partition_spec(boxed["params"])
  assert specs["blocks_0"]["attention"]["prefix"]["key"] == jax.sharding.PartitionSpec(
      "streams", "prefix", "kv_heads", "head_dim")
  assert specs["aggregator"]["hidden"] == jax.sharding.PartitionSpec("streams", "embed", "mlp")
  assert specs["aggregator"]["out"] == jax.sharding.PartitionSpec("mlp", "streams")
  cache, axes = model.init_cache(2, 4), parscale.StreamCache.logical_axes(model.config.num_layers)
  for spec, leaf in zip(jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)),
                        jax.tree.leaves(cache)):
    assert len(spec) == leaf.ndim


@pytest.mark.parametrize("changes, message", [
    (dict(parscale=ParScaleConfig(streams=0)), "model.parscale.streams must be >= 1"),
    (dict(parscale=ParScaleConfig(streams=2)),
     "parscale.streams=2 needs model.parscale.prefix_len >= 1"),
    (dict(parscale=ParScaleConfig(prefix_len=-1)), "parscale.prefix_len must be >= 0"),
    (dict(parscale=ParScaleConfig(streams=2, prefix_len=2, smoothing=1.5)),
     r"parscale.smoothing must be in \[0, 1\]"),
    (dict(parscale=ParScaleConfig(prefix_len=2), attention="ring"),
     "needs model.attention='dense'"),
    (dict(kind="mdlm", parscale=ParScaleConfig(streams=2, prefix_len=2)), "is a llama option"),
])
def test_bad_parscale_config_is_a_clear_error(changes, message):
  with pytest.raises(ValueError, match=message):
    dataclasses.replace(BASE, **changes).validate()


# ------------------------------------------------------------------------------------ training

registry.load_modules()


def _exp(*overrides):
  return config_lib.validate(config_lib.apply_overrides(registry.get("tiny"), [
      "model.d_model=32", "model.mlp_dim=64", "data.seq_len=32", "train.steps=12",
      "checkpoint.every_steps=12", "eval.every_steps=12", "eval.batches=2", *overrides]))


def _run(exp, workdir):
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.json").write_text(config_lib.to_json(exp))
  trainer = Trainer(exp, workdir, log=lambda _: None)
  result = trainer.run()
  return result, [r for r in read_metrics(workdir / "metrics.jsonl")], trainer


@pytest.mark.slow
def test_trains_from_scratch(tmp_path):
  """P = 2 streams trained by the ordinary trainer from a fresh init: the loss falls."""
  result, records, _ = _run(_exp("model.parscale.streams=2", "model.parscale.prefix_len=4",
                                 "eval.every_steps=0"), tmp_path / "p2")
  losses = [r["loss"] for r in records if "loss" in r]
  assert len(losses) == 12 and losses[-1] < losses[0] - 0.5, losses
  assert result.eval_loss < losses[0] - 0.5


@pytest.mark.slow
def test_post_training_a_base_run_starts_at_its_loss(tmp_path):
  """P = 2 initialised from a trained P = 1 run (train.init_from) starts at the base's held-out
  loss (the fresh prefixes and aggregator barely perturb it); with train.trainable =
  'prefix|aggregator' the shared weights stay exactly the base's."""
  base, _, _ = _run(_exp("train.steps=8", "checkpoint.every_steps=8",
                         "eval.every_steps=0"), tmp_path / "base")
  tuned, records, _ = _run(_exp(
      "model.parscale.streams=2", "model.parscale.prefix_len=4", "train.steps=2",
      "checkpoint.every_steps=2", "eval.every_steps=2", f"train.init_from={tmp_path / 'base'}",
      "train.trainable=prefix|aggregator"), tmp_path / "tuned")
  start = records[0]
  assert start["step"] == 0 and abs(start["eval_loss"] - base.eval_loss) < 0.02 * base.eval_loss
  base_params = Run(tmp_path / "base").restore().params
  for path, value in jax.tree_util.tree_leaves_with_path(tuned.params):
    name = "/".join(str(k.key) for k in path)
    if "prefix" not in name and "aggregator" not in name:
      np.testing.assert_array_equal(value, _leaf(base_params, path), err_msg=name)


def _leaf(params, path):
  for key in path:
    params = params[key.key]
  return params

"""Token-tree speculative sampling (static and dynamic trees): exact target joint (oracle, with a
broken sibling verifier caught), greedy equality with AR on a Llama pair at batch 1 and 3, the
static tree's structure, generic cache compaction, batching, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import kv_cache
from models.causal_lm import CausalLM
from models.config import ModelConfig
from samplers import ar, tree
from samplers.core import slots, tree_shape, verify
from samplers.core.logits import SamplingParams
from tests.models.random_params import random_params
from tests.samplers import oracle, toy
from tests.samplers.oracle import POWER, SIGNIFICANCE, distribution, p_value
from tests.samplers.toy import DRAFT, ORACLE_PROMPTS, ORACLE_ROWS, ORACLE_STEPS, TARGET, TOY

GREEDY = SamplingParams(temperature=0.0)

FILTERED = SamplingParams(temperature=0.8, top_k=3, top_p=0.9)


def _oracle_p_values(config, prompts=ORACLE_PROMPTS, seed=0):
  """p-value per prompt of ORACLE_ROWS samples each (one batch) against the exact joint."""
  prompt, lengths = ar.pad_prompts([p for p in prompts for _ in range(ORACLE_ROWS)])
  out = tree.sample(TOY, TARGET, TOY, DRAFT, prompt, lengths, jax.random.key(seed), config)
  tokens = np.asarray(out.tokens).reshape(len(prompts), ORACLE_ROWS, ORACLE_STEPS)
  return [p_value(rows, toy.exact_joint(TARGET, prompt_tokens, ORACLE_STEPS,
                                        distribution(config.sampling), config.eos_id,
                                        config.pad_id))[0]
          for prompt_tokens, rows in zip(prompts, tokens)]


STATIC_IID = tree.TreeConfig(branching=(2, 2), max_new_tokens=ORACLE_STEPS)
# Dynamic trees realised on these tables have depth-1 nodes with 2 children (see
# test_dynamic_tree_is_the_top_n_by_draft_path_probability).
DYNAMIC = tree.DynamicTreeConfig(node_budget=6, max_depth=3, max_new_tokens=ORACLE_STEPS,
                                 max_children=2)
# (config, prompts): dynamic trees on one prompt each to keep the test short. STATIC_IID and
# DYNAMIC at temperature 1 are checked over 8 tokens of a prefix-sensitive toy (test_long_oracle).
ORACLE_CASES = [
    (tree.TreeConfig(branching=(2, 2), max_new_tokens=ORACLE_STEPS, sampling=FILTERED, eos_id=0),
     ORACLE_PROMPTS),
    (tree.TreeConfig(branching=(3, 2), max_new_tokens=ORACLE_STEPS,
                     children="without_replacement"), ORACLE_PROMPTS),
    (tree.TreeConfig(branching=(2, 2), max_new_tokens=ORACLE_STEPS, children="top",
                     sampling=FILTERED), ORACLE_PROMPTS),
    (tree.DynamicTreeConfig(node_budget=5, max_depth=2, max_new_tokens=ORACLE_STEPS,
                            sampling=FILTERED, eos_id=0), ORACLE_PROMPTS[1:]),
]


@pytest.mark.slow
@pytest.mark.parametrize("config,prompts", ORACLE_CASES, ids=[
    "static-iid-22-t0.8-k3-p0.9-eos", "static-wor-32", "static-top-22-filtered",
    "dynamic-n5-d2-t0.8-k3-p0.9-eos"])
def test_joint_matches_the_exact_target_joint(config, prompts):
  """100k samples per prompt; Pearson chi-square over the 625 continuations (pooled below 5
  expected); a correct sampler gives p > 1e-3 (fixed seed)."""
  assert min(_oracle_p_values(config, prompts)) > SIGNIFICANCE


@pytest.mark.slow
@pytest.mark.parametrize("config", [STATIC_IID, DYNAMIC], ids=["static-iid", "dynamic"])
def test_no_residual_update_between_siblings_fails_the_oracle(fresh_trace, config):
  """Power: trying the next sibling (and drawing the final token) against p instead of the
  updated residual p_cur is caught."""
  fresh_trace.setattr(verify, "residual", lambda p, q: p)
  assert _oracle_p_values(config, ORACLE_PROMPTS[:1])[0] < POWER


def test_static_tree_structure():
  t = tree_shape.static_tree((2, 2, 1))
  assert t.level_sizes == (2, 4, 4) and t.num_nodes == 10
  np.testing.assert_array_equal(t.parent, [-1, -1, 0, 0, 1, 1, 2, 3, 4, 5])
  np.testing.assert_array_equal(t.depth, [1, 1, 2, 2, 2, 2, 3, 3, 3, 3])
  assert t.ancestors[8].tolist() == [0, 1, 0, 0, 1, 0, 0, 0, 1, 0]  # 8 -> 4 -> 1
  np.testing.assert_array_equal(tree_shape.ancestor_mask(jnp.asarray(t.parent), 3), t.ancestors)
  mask = tree_shape.feed_mask(t.ancestors[:2, :2], 2)
  assert mask.astype(int).tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 0, 1]]


@pytest.mark.parametrize("config", [
    DYNAMIC, tree.DynamicTreeConfig(node_budget=7, max_depth=3, max_new_tokens=4,
                                    sampling=FILTERED)], ids=["n6-d3-c2", "n7-d3-filtered"])
def test_dynamic_tree_is_the_top_n_by_draft_path_probability(config):
  """DySpec's greedy growth = the N draft sequences of <= D tokens with the highest path
  probability (children per node capped at max_children), by brute force over the toy draft;
  and some depth-1 node has >= 2 children (branching >= 2 at depth 2)."""
  last_two = jnp.asarray([[1, 2], [0, 3], [2, 4], [4, 4]], jnp.int32)
  context = jnp.full((4,), 2, jnp.int32)
  grow = jax.jit(tree._grow_dynamic, static_argnums=(0, 2))  # pylint: disable=protected-access
  tokens, parent, depth, _, valid, _, _ = grow(TOY, DRAFT, config, TOY.init_cache(4, 16),
                                               last_two, context)
  dist = distribution(config.sampling)
  fan = config.max_children or config.node_budget
  branching_two = False
  for row, (a, b) in enumerate(np.asarray(last_two)):
    paths = {}  # sequence -> path probability
    frontier = [((), 1.0, (a, b))]
    for _ in range(config.max_depth):
      grown = []
      for seq, prob, (prev, cur) in frontier:
        q = dist(np.asarray(DRAFT)[prev, cur])
        for x in np.argsort(-q, kind="stable")[:fan]:
          if q[x] > 0:
            grown.append((seq + (int(x),), prob * q[x], (cur, int(x))))
      paths.update({seq: prob for seq, prob, _ in grown})
      frontier = grown
    best = sorted(paths.items(), key=lambda item: (-item[1], len(item[0])))[:config.node_budget]
    got = set()
    for j in np.flatnonzero(np.asarray(valid[row])):
      seq, k = [], j
      while k >= 0:
        seq.insert(0, int(tokens[row, k]))
        k = int(parent[row, k])
      assert len(seq) == int(depth[row, j])
      got.add(tuple(seq))
    assert got == {seq for seq, _ in best}, row
    children = np.bincount(np.asarray(parent[row])[np.asarray(valid[row]) &
                                                  (np.asarray(depth[row]) == 2)], minlength=7)
    branching_two |= bool(np.any(children >= 2))
  assert branching_two


def test_compact_equals_the_kv_caches_gather_slots():
  """Generic compaction (slot and row axes found from init_cache shapes) = kv_cache.gather_slots."""
  model = CausalLM(ModelConfig(num_layers=2, vocab_size=8, d_model=8, num_heads=2, num_kv_heads=1,
                               mlp_dim=8, max_len=12))
  cache = model.init_cache(3, 12)
  rng = np.random.default_rng(0)
  noise = lambda buffers: tuple(jnp.asarray(rng.normal(size=b.shape), b.dtype) for b in buffers)
  cache = cache.replace(keys=noise(cache.keys), values=noise(cache.values),
                        lengths=jnp.asarray([4, 5, 6], jnp.int32))
  index, start = jnp.asarray([[6, 8], [5, 9], [7, 7]], jnp.int32), jnp.asarray([5, 5, 6], jnp.int32)
  got = slots.compact(model, cache, 12, index, start)
  want = kv_cache.gather_slots(cache, index, start)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)


LLAMA = dict(vocab_size=32, d_model=32, num_heads=4, num_kv_heads=2, mlp_dim=64, max_len=48,
             init_std=0.5, tie_embeddings=False)
LLAMA_TARGET = CausalLM(ModelConfig(num_layers=2, **LLAMA))
LLAMA_DRAFT = CausalLM(ModelConfig(num_layers=1, **LLAMA))
LLAMA_PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [31]]
LLAMA_STEPS = 12


@pytest.fixture(scope="module")
def llama_pair():
  """A one-layer draft made of the target's embedding, first block and head (the target's second
  block damped): mixed acceptance."""
  params = random_params(LLAMA_TARGET)
  block = jax.tree.map(lambda x: x, params["blocks_1"])
  block["attention"]["out"]["kernel"] = 0.3 * block["attention"]["out"]["kernel"]
  block["mlp"]["down"]["kernel"] = 0.3 * block["mlp"]["down"]["kernel"]
  target = {**params, "blocks_1": block}
  draft = {name: value for name, value in target.items() if name != "blocks_1"}
  prompt, lengths = ar.pad_prompts(LLAMA_PROMPTS)
  expected = np.asarray(ar.sample(LLAMA_TARGET, target, prompt, lengths, jax.random.key(0),
                                  ar.ARConfig(max_new_tokens=LLAMA_STEPS, sampling=GREEDY)).tokens)
  return target, draft, expected


def _ties(tokens, expected, target_params, prompts):
  """Rows differing from greedy AR; each first mismatch must follow a near-tie (< 1e-4)."""
  ties = 0
  for row in np.flatnonzero(np.any(tokens != expected, axis=1)):
    t = int(np.argmax(tokens[row] != expected[row]))
    context = prompts[row] + list(expected[row, :t])
    logits = np.asarray(LLAMA_TARGET.logits(target_params, jnp.asarray([context])))[0, -1]
    best, runner_up = np.sort(logits)[::-1][:2]
    assert best - runner_up < 1e-4, (row, t, best - runner_up)
    ties += 1
  return ties


@pytest.mark.parametrize("config", [
    tree.TreeConfig(branching=(3, 2, 1), max_new_tokens=LLAMA_STEPS, sampling=GREEDY),
    tree.DynamicTreeConfig(node_budget=8, max_depth=4, max_new_tokens=LLAMA_STEPS,
                           sampling=GREEDY)], ids=["static-321", "dynamic-n8-d4"])
def test_greedy_equals_greedy_ar_on_a_llama_pair_at_batch_1_and_3(llama_pair, config):
  """Token for token (mismatches only after a near-tie, at most one); the target's cache must hold
  the accepted path's KV (compacted), or later rounds diverge."""
  target, draft, expected = llama_pair
  prompt, lengths = ar.pad_prompts(LLAMA_PROMPTS)
  out = tree.sample(LLAMA_TARGET, target, LLAMA_DRAFT, draft, prompt, lengths, jax.random.key(0),
                    config)
  ties = _ties(np.asarray(out.tokens), expected, target, LLAMA_PROMPTS)
  for row, single in enumerate(LLAMA_PROMPTS):  # batch 1 (same padded width: one compile)
    one = tree.sample(LLAMA_TARGET, target, LLAMA_DRAFT, draft, prompt[row:row + 1],
                      lengths[row:row + 1], jax.random.key(0), config)
    ties += _ties(np.asarray(one.tokens), expected[row:row + 1], target, [single])
  assert ties <= 1, f"{ties} near-ties"
  assert 0 < float(out.stats["acceptance"]) < 1 and int(out.stats["rejections"]) > 0
  assert int(out.stats["target_calls"]) < LLAMA_STEPS
  assert int(out.stats["draft_calls"]) == 1 + config.num_draft_tokens * (
      int(out.stats["target_calls"]) - 1)


@pytest.mark.parametrize("config", [
    tree.TreeConfig(branching=(2, 2), max_new_tokens=6, eos_id=0),
    tree.DynamicTreeConfig(node_budget=5, max_depth=2, max_new_tokens=6, eos_id=0)],
    ids=["static", "dynamic"])
def test_rows_follow_their_keys_whatever_the_batch_order_and_under_vmap(config):
  """Reversed batch order with reversed keys; vmap over two distinct key sets equals separate
  runs (and the second set gives other tokens)."""
  prompt, lengths = ar.pad_prompts([[1, 2], [3], [0, 1, 2], [2, 2]])
  run = lambda order, row_keys: tree.sample(TOY, TARGET, TOY, DRAFT, prompt[order],
                                            lengths[order], row_keys, config)
  oracle.assert_rows_follow_their_keys(run)


def test_malformed_tree_shape_and_bad_input_are_clear_errors():
  for bad, message in [((), "branching is empty"), ((2, 0), r"int >= 1, got \(2, 0\)"),
                       ((2, 1.5), "int >= 1"), (3, "must be a sequence")]:
    with pytest.raises(ValueError, match="tree spec malformed: .*" + message):
      tree.TreeConfig(branching=bad, max_new_tokens=4)
  with pytest.raises(ValueError, match="tree spec malformed: node_budget must be >= 1, got 0"):
    tree.DynamicTreeConfig(node_budget=0, max_depth=2, max_new_tokens=4)
  with pytest.raises(ValueError, match="tree spec malformed: max_depth must be >= 1, got 0"):
    tree.DynamicTreeConfig(node_budget=4, max_depth=0, max_new_tokens=4)
  with pytest.raises(ValueError, match="children must be one of"):
    tree.TreeConfig(branching=(2,), max_new_tokens=4, children="beam")
  with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
    tree.TreeConfig(branching=(2,), max_new_tokens=0)
  prompt, lengths = ar.pad_prompts([[1] * 4])
  config = tree.TreeConfig(branching=(6, 1), max_new_tokens=4, children="without_replacement")
  with pytest.raises(ValueError, match="tree spec malformed: branching factor 6 exceeds vocab_size"):
    tree.sample(TOY, TARGET, TOY, DRAFT, prompt, lengths, jax.random.key(0), config)
  config = tree.TreeConfig(branching=(3, 3), max_new_tokens=4)
  with pytest.raises(ValueError, match=r"tree nodes 12 = 19 exceeds the target's max_len 16"):
    tree.sample(TOY, TARGET, TOY, DRAFT, prompt, lengths, jax.random.key(0), config)
  with pytest.raises(ValueError, match="draft's vocab_size 6 differs from the target's vocab_size 5"):
    other = toy.TrigramLM(vocab_size=6, max_len=16)
    tree.sample(TOY, TARGET, other, other.init(jax.random.key(0)), prompt, lengths,
                jax.random.key(0), tree.TreeConfig(branching=(2,), max_new_tokens=4))


@pytest.mark.parametrize("config", [
    tree.TreeConfig(branching=(2, 2, 1), max_new_tokens=LLAMA_STEPS, sampling=GREEDY),
    tree.DynamicTreeConfig(node_budget=3, max_depth=3, max_new_tokens=LLAMA_STEPS,
                           sampling=GREEDY, max_children=1)], ids=["static-221", "dynamic-chain"])
def test_a_draft_equal_to_the_target_is_always_accepted(llama_pair, config):
  """Greedy with draft = target (the Llama target): every round accepts all D = 3 levels, which
  needs the draft's cache to hold the accepted path after compaction (the static tree's path
  moves slots, and without the draft's compaction acceptance drops; the dynamic chain's does
  not move)."""
  target, _, expected = llama_pair
  prompt, lengths = ar.pad_prompts(LLAMA_PROMPTS)
  out = tree.sample(LLAMA_TARGET, target, LLAMA_TARGET, target, prompt, lengths,
                    jax.random.key(0), config)
  assert _ties(np.asarray(out.tokens), expected, target, LLAMA_PROMPTS) == 0
  assert float(out.stats["acceptance"]) == 1.0
  assert int(out.stats["target_calls"]) == 1 + 3  # prefill, then 11 tokens in rounds of 4

"""EAGLE decoding: greedy equality with AR (a toy whose head drafts right only when the sampler
hands it the right features and keeps its cache right, and a Llama with a random head),
stopping, per-row randomness and bad input. Its exact target joint at T = 1 over eight tokens,
with a broken residual caught, is in test_long_oracle."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.config import DraftHeadsConfig, ModelConfig
from models.eagle import EagleLM
from samplers import ar, eagle
from samplers.core.logits import SamplingParams
from tests.models.random_params import random_params
from tests.samplers import oracle, toy
from tests.samplers.toy_drafters import WithFeatureHead, at_rows

GREEDY = SamplingParams(temperature=0.0)
VOCAB = 8


def _fibonacci(vocab: int = VOCAB) -> jax.Array:
  """A trigram table whose greedy continuation of (a, b) is a + b + 1 (mod vocab): the next token
  depends on both, so a head that reads the wrong feature or cache slot drafts wrong tokens."""
  index = np.arange(vocab)
  table = np.zeros((vocab,) * 3, np.float32)
  table[index[:, None], index[None, :], (index[:, None] + index[None, :] + 1) % vocab] = 5.0
  return jnp.asarray(table)


def _toy(batch: int, head: str, max_len: int = 40):
  model = WithFeatureHead(toy.TrigramLM(vocab_size=VOCAB, max_len=max_len))
  table = _fibonacci() + 0.1 * jax.random.normal(jax.random.key(batch), (VOCAB,) * 3)
  heads = {"right": table, "random": 2.0 * jax.random.normal(jax.random.key(batch + 10),
                                                              (VOCAB,) * 3)}
  return model, {"base": table, "head": heads[head]}


@pytest.mark.parametrize("batch, head, threshold", [(1, "right", 0.0), (8, "right", 0.0),
                                                    (3, "random", 0.0), (8, "random", 0.0),
                                                    (8, "random", 0.95)])
def test_equals_greedy_ar_on_a_table_model(batch, head, threshold):
  """A `right` head drafts the target's own continuation (every draft accepted), a `random`
  one mostly wrong tokens; both give AR's tokens, and so does a row that stops drafting where
  the head is unsure (`confidence_threshold`)."""
  model, params = _toy(batch, head)
  rng = np.random.default_rng(batch)
  padded = ar.pad_prompts([rng.integers(0, VOCAB, rng.integers(1, 6)).tolist()
                           for _ in range(batch)])
  expected = ar.sample(model, params, *padded, jax.random.key(0),
                       ar.ARConfig(max_new_tokens=16, sampling=GREEDY))
  got = eagle.sample(model, params, *padded, jax.random.key(0),
                     eagle.EagleConfig(num_draft_tokens=4, max_new_tokens=16, sampling=GREEDY,
                                       confidence_threshold=threshold))
  np.testing.assert_array_equal(got.tokens, expected.tokens)
  stats = {k: float(v) for k, v in got.stats.items()}
  if threshold:
    assert 1.0 <= stats["mean_draft_length"] < 3.5 and stats["draft_calls_saved"] > 0, stats
  elif head == "right":
    assert stats["acceptance"] > 0.95 and stats["tokens_per_target_call"] > 3.0, stats
  else:
    assert stats["acceptance"] < 0.6, stats


def test_one_token_prompts():
  """P = 1: the head starts from no prompt pairs, only the first token's feature."""
  model, params = _toy(1, "right")
  padded = ar.pad_prompts([[3], [5]])
  expected = ar.sample(model, params, *padded, jax.random.key(0),
                       ar.ARConfig(max_new_tokens=8, sampling=GREEDY))
  got = eagle.sample(model, params, *padded, jax.random.key(0),
                     eagle.EagleConfig(num_draft_tokens=3, max_new_tokens=8, sampling=GREEDY))
  np.testing.assert_array_equal(got.tokens, expected.tokens)


@pytest.mark.parametrize("tree_nodes, tree_children", [(0, 0), (6, 3)])  # chain, EAGLE-2 tree
def test_equals_greedy_ar_on_a_llama_with_a_head(tree_nodes, tree_children):
  config = ModelConfig(vocab_size=32, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2,
                       mlp_dim=64, max_len=48, init_std=0.5, tie_embeddings=False,
                       draft_heads=DraftHeadsConfig(eagle=True))
  model = EagleLM(config)
  params = random_params(model)
  padded = ar.pad_prompts([[1, 2, 3, 4, 5], [7, 8], [3, 3, 3, 1], [9]])
  expected = ar.sample(model, params, *padded, jax.random.key(0),
                       ar.ARConfig(max_new_tokens=16, sampling=GREEDY))
  got = eagle.sample(model, params, *padded, jax.random.key(0),
                     eagle.EagleConfig(num_draft_tokens=3, max_new_tokens=16, sampling=GREEDY,
                                       tree_nodes=tree_nodes, tree_children=tree_children))
  mismatched = np.flatnonzero(np.any(np.asarray(got.tokens != expected.tokens), axis=1))
  assert mismatched.size <= 1, mismatched  # a float near-tie at most
  assert int(got.stats["draft_calls"]) == 1 + 3 * (int(got.stats["target_calls"]) - 1)


def test_eos_and_max_new_tokens_stop_rows_independently():
  model, params = _toy(1, "right", max_len=24)
  prompt, lengths = ar.pad_prompts([[5], [0, 2], [6, 6], [1]])
  config = eagle.EagleConfig(num_draft_tokens=3, max_new_tokens=6, sampling=GREEDY, eos_id=7)
  out = eagle.sample(model, params, prompt, lengths, jax.random.key(0), config)
  expected = ar.sample(model, params, prompt, lengths, jax.random.key(0),
                       ar.ARConfig(max_new_tokens=6, sampling=GREEDY, eos_id=7))
  np.testing.assert_array_equal(out.tokens, expected.tokens)
  np.testing.assert_array_equal(out.lengths, expected.lengths)
  assert sorted(set(np.asarray(out.lengths).tolist())) != [6], out.lengths  # some stop at eos


def test_rows_follow_their_keys_whatever_the_batch_order_and_under_vmap():
  model = WithFeatureHead(toy.TOY)
  params = {"base": toy.TARGET, "head": toy.TOY.init(jax.random.key(3))}
  prompt, lengths = ar.pad_prompts([[1, 2], [3], [0, 1, 2], [2, 2]])
  for threshold in (0.0, 0.6):  # rows that stop drafting early share the draft loop
    config = eagle.EagleConfig(num_draft_tokens=2, max_new_tokens=6, eos_id=0,
                               confidence_threshold=threshold)
    run = lambda order, row_keys: eagle.sample(model, params, prompt[order], lengths[order],
                                               row_keys, config)
    oracle.assert_rows_follow_their_keys(run)


def test_bad_input_is_a_clear_error():
  prompt, lengths = ar.pad_prompts([[1, 2]])
  config = eagle.EagleConfig(num_draft_tokens=2, max_new_tokens=4)
  with pytest.raises(ValueError, match="needs a target with an EAGLE draft head"):
    eagle.sample(toy.TOY, toy.TARGET, prompt, lengths, jax.random.key(0), config)
  model, params = _toy(1, "right", max_len=6)
  with pytest.raises(ValueError, match=r"num_draft_tokens 2 - 1 = 7 exceeds the target's max_len"):
    eagle.sample(model, params, prompt, lengths, jax.random.key(0), config)
  with pytest.raises(ValueError, match="num_draft_tokens"):
    eagle.EagleConfig(num_draft_tokens=0, max_new_tokens=4)
  with pytest.raises(ValueError, match=r"confidence_threshold must be in \[0, 1\]"):
    eagle.EagleConfig(num_draft_tokens=2, max_new_tokens=4, confidence_threshold=1.5)


@dataclasses.dataclass(frozen=True)
class _OneReadHead(WithFeatureHead):
  """The toy head reading one of its two inputs: its cache (the previous pair's token, which in a
  tree is the parent's only if the ancestors' pairs are visible) or the fed feature (the
  parent's predicted feature, the one-hot of the parent's token)."""

  reads: str = "cache"

  def draft(self, params, features, tokens, positions, cache, attention_mask=None, rows=None):
    from_cache, cache = self._pairs.apply(params["head"], tokens, positions, cache,
                                          attention_mask)
    from_features = params["head"][jnp.argmax(features, axis=-1), tokens]
    logits = from_cache if self.reads == "cache" else from_features
    return (at_rows(logits, rows), at_rows(jax.nn.one_hot(tokens, self.vocab_size), rows),
            cache)


@dataclasses.dataclass(frozen=True)
class _HidesAncestors(_OneReadHead):
  """The broken variant: the head's tree calls see no ancestors (each node only itself), which
  is what a tree that forgot the ancestor mask would feed it."""

  def draft(self, params, features, tokens, positions, cache, attention_mask=None, rows=None):
    if attention_mask is not None:
      attention_mask = attention_mask & jnp.eye(tokens.shape[1], dtype=bool)
    return super().draft(params, features, tokens, positions, cache, attention_mask, rows)


def _second_choice_head(reads: str = "cache", kind=_OneReadHead) -> tuple[_OneReadHead, dict]:
  """A head whose top draft is always wrong and whose second is the target's greedy token, so a
  chain never gets a draft accepted and only a tree's second children do."""
  index = np.arange(VOCAB)
  table = np.asarray(_fibonacci())
  wrong = np.zeros_like(table)
  wrong[index[:, None], index[None, :], (index[:, None] + index[None, :] + 2) % VOCAB] = 5.2
  model = kind(toy.TrigramLM(vocab_size=VOCAB, max_len=40), reads)
  return model, {"base": jnp.asarray(table), "head": jnp.asarray(table + wrong)}


def _prompts(batch: int):
  rng = np.random.default_rng(batch)
  return ar.pad_prompts([rng.integers(0, VOCAB, rng.integers(1, 6)).tolist()
                         for _ in range(batch)])


@pytest.mark.parametrize("batch, head, nodes, children", [
    (1, "right", 6, 2), (8, "right", 8, 0), (3, "random", 8, 0), (8, "random", 4, 1),
    (3, "cache", 16, 2), (3, "features", 16, 2)])
def test_dynamic_tree_equals_greedy_ar(batch, head, nodes, children):
  """EAGLE-2's tree gives AR's tokens whatever the head drafts. A second-choice head's drafts
  are accepted only through the tree's second children (a chain accepts none of them) and only
  if every node is fed its ancestors' pairs (`cache`) and its parent's predicted feature
  (`features`)."""
  second = head in ("cache", "features")  # a second-choice head reading one input
  model, params = _second_choice_head(head) if second else _toy(batch, head)
  padded = _prompts(batch)
  expected = ar.sample(model, params, *padded, jax.random.key(0),
                       ar.ARConfig(max_new_tokens=16, sampling=GREEDY))
  config = eagle.EagleConfig(num_draft_tokens=4, max_new_tokens=16, sampling=GREEDY,
                             tree_nodes=nodes, tree_children=children)
  got = eagle.sample(model, params, *padded, jax.random.key(0), config)
  np.testing.assert_array_equal(got.tokens, expected.tokens)
  stats = {k: float(v) for k, v in got.stats.items()}
  assert stats["draft_calls"] == 1 + 4 * (stats["target_calls"] - 1), stats  # D head calls
  if head == "right":
    assert stats["tokens_per_target_call"] > 3.0, stats
  if second:
    chain = eagle.sample(model, params, *padded, jax.random.key(0),
                         eagle.EagleConfig(num_draft_tokens=4, max_new_tokens=16, sampling=GREEDY))
    assert float(chain.stats["accepted_tokens"]) == 0, chain.stats
    assert stats["tokens_per_target_call"] > 2.5, stats


def test_dynamic_tree_that_hides_ancestors_from_the_head_is_caught():
  """Caught by the second-choice head's acceptance: deeper drafts go wrong, output stays AR's."""
  model, params = _second_choice_head()
  broken_model, _ = _second_choice_head(kind=_HidesAncestors)
  padded = _prompts(3)
  config = eagle.EagleConfig(num_draft_tokens=4, max_new_tokens=16, sampling=GREEDY,
                             tree_nodes=16, tree_children=2)
  right = eagle.sample(model, params, *padded, jax.random.key(0), config)
  broken = eagle.sample(broken_model, params, *padded, jax.random.key(0), config)
  np.testing.assert_array_equal(broken.tokens, right.tokens)  # exactness does not need the head
  assert float(right.stats["tokens_per_target_call"]) > 3.0, right.stats  # greedy: no noise
  assert float(broken.stats["tokens_per_target_call"]) < 2.9, broken.stats


def test_dynamic_tree_rows_follow_their_keys():
  model = WithFeatureHead(toy.TOY)
  params = {"base": toy.TARGET, "head": toy.TOY.init(jax.random.key(3))}
  prompt, lengths = ar.pad_prompts([[1, 2], [3], [0, 1, 2], [2, 2]])
  config = eagle.EagleConfig(num_draft_tokens=2, max_new_tokens=6, eos_id=0, tree_nodes=3)
  run = lambda order, row_keys: eagle.sample(model, params, prompt[order], lengths[order],
                                             row_keys, config)
  oracle.assert_rows_follow_their_keys(run)


def test_dynamic_tree_bad_input_is_a_clear_error():
  with pytest.raises(ValueError, match=r"tree_nodes must be >= 0 \(0: a chain\)"):
    eagle.EagleConfig(num_draft_tokens=2, max_new_tokens=4, tree_nodes=-1)
  with pytest.raises(ValueError, match="tree_children must be >= 0"):
    eagle.EagleConfig(num_draft_tokens=2, max_new_tokens=4, tree_nodes=4, tree_children=-2)
  with pytest.raises(ValueError, match="tree_children=2 shapes a tree, but tree_nodes=0"):
    eagle.EagleConfig(num_draft_tokens=2, max_new_tokens=4, tree_children=2)
  with pytest.raises(ValueError, match="set num_draft_tokens <= tree_nodes"):
    eagle.EagleConfig(num_draft_tokens=5, max_new_tokens=4, tree_nodes=3)
  with pytest.raises(ValueError, match="already drafts by confidence"):
    eagle.EagleConfig(num_draft_tokens=2, max_new_tokens=4, tree_nodes=4,
                      confidence_threshold=0.5)
  model, params = _toy(1, "right", max_len=12)
  prompt, lengths = ar.pad_prompts([[1, 2]])
  config = eagle.EagleConfig(num_draft_tokens=2, max_new_tokens=4, tree_nodes=8)
  with pytest.raises(ValueError, match=r"max\(tree_nodes, num_draft_tokens\) 8 = 13 exceeds"):
    eagle.sample(model, params, prompt, lengths, jax.random.key(0), config)

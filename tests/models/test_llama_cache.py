"""Cached calls of the decoder agree with its full causal forward (float32, within 1e-5)."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from models.kv_cache import gather_slots

ATOL = 1e-5


def _tokens(seed, shape, vocab):
  return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape), jnp.int32)


def _positions(start, steps):
  """[B, steps] int32 positions start[b] + i."""
  return jnp.asarray(start, jnp.int32)[:, None] + jnp.arange(steps, dtype=jnp.int32)


@pytest.mark.parametrize("kv_heads, tie", [(2, True), (1, False)])  # GQA tied, MQA untied head
def test_incremental_decode_matches_full_forward(small_config, build, apply, full_logits, kv_heads,
                                                 tie):
  config = dataclasses.replace(small_config, num_kv_heads=kv_heads, tie_embeddings=tie)
  model, params = build(config)
  tokens = _tokens(0, (2, 12), model.vocab_size)
  expected = full_logits(model, params, tokens)
  cache = model.init_cache(2, 16)  # more slots than tokens: stale slots must stay invisible
  chunks, start = [], 0
  for steps in (4, 1, 1, 3, 3):  # prefill, one token at a time, several at a time
    logits, cache = apply(model, params, tokens[:, start:start + steps],
                          _positions([start, start], steps), cache)
    chunks.append(logits)
    start += steps
  assert start == tokens.shape[1]
  np.testing.assert_array_equal(cache.lengths, [12, 12])
  np.testing.assert_allclose(jnp.concatenate(chunks, axis=1), expected, atol=ATOL)


def test_full_forward_is_causal(small_config, build, full_logits):
  model, params = build(small_config)
  tokens = _tokens(1, (1, 8), model.vocab_size)
  changed = tokens.at[0, 5].set((tokens[0, 5] + 1) % model.vocab_size)
  a, b = full_logits(model, params, tokens), full_logits(model, params, changed)
  np.testing.assert_array_equal(a[:, :5], b[:, :5])
  assert np.abs(a[:, 5:] - b[:, 5:]).max() > 1e-3


def test_ragged_rows_match_each_row_alone(small_config, build, apply):
  """Rows with different cache lengths in one batch give the logits of each row decoded alone."""
  model, params = build(small_config)
  prompts = _tokens(2, (2, 6), model.vocab_size)
  lengths = jnp.array([3, 6], jnp.int32)
  new = _tokens(3, (2, 2), model.vocab_size)

  cache = model.init_cache(2, 12)
  _, cache = apply(model, params, prompts, _positions([0, 0], 6), cache)
  cache = cache.replace(lengths=lengths)  # row 0 rolls back over its padding
  batched, cache = apply(model, params, new, _positions(lengths, 2), cache)
  np.testing.assert_array_equal(cache.lengths, [5, 8])

  for row in range(2):
    n = int(lengths[row])
    alone = model.init_cache(1, 12)
    _, alone = apply(model, params, prompts[row:row + 1, :n], _positions([0], n), alone)
    expected, _ = apply(model, params, new[row:row + 1], _positions([n], 2), alone)
    np.testing.assert_allclose(batched[row], expected[0], atol=ATOL)


def test_rows_roll_back_by_different_amounts(small_config, build, apply, full_logits):
  """After per-row rollback, rejected draft slots are never attended to and get overwritten."""
  model, params = build(small_config)
  tokens = _tokens(4, (2, 9), model.vocab_size)
  junk = _tokens(5, (2, 4), model.vocab_size)
  accepted = np.array([1, 3])
  draft = jnp.where(jnp.arange(4) < accepted[:, None], tokens[:, 4:8], junk)
  cache = model.init_cache(2, 12)
  _, cache = apply(model, params, tokens[:, :4], _positions([0, 0], 4), cache)
  _, cache = apply(model, params, draft, _positions([4, 4], 4), cache)
  cache = cache.replace(lengths=cache.lengths - 4 + accepted)
  nxt = jnp.stack([tokens[0, 5:7], tokens[1, 7:9]])
  logits, _ = apply(model, params, nxt, _positions(4 + accepted, 2), cache)
  expected = full_logits(model, params, tokens)
  np.testing.assert_allclose(logits[0], expected[0, 5:7], atol=ATOL)
  np.testing.assert_allclose(logits[1], expected[1, 7:9], atol=ATOL)


# A token tree verified in one call: a at depth 0; b and c children of a; d child of b.
TREE_MASK = np.array([[1, 0, 0, 0],
                      [1, 1, 0, 0],
                      [1, 0, 1, 0],
                      [1, 1, 0, 1]], bool)
TREE_DEPTH = np.array([0, 1, 1, 2])
PATHS = {"b": [0, 1, 3], "c": [0, 2]}  # root-to-leaf node indices


def test_tree_attention_mask_and_path_compaction(small_config, build, apply, full_logits):
  """A tree pass equals one full forward per branch; compacting an accepted path with
  gather_slots lets decoding continue as if only that path had been fed."""
  model, params = build(small_config)
  prefix_len = 5
  prefix = _tokens(6, (1, prefix_len), model.vocab_size)
  tree = _tokens(7, (1, 4), model.vocab_size)
  batch_prefix, batch_tree = jnp.tile(prefix, (2, 1)), jnp.tile(tree, (2, 1))

  cache = model.init_cache(2, 16)
  _, cache = apply(model, params, batch_prefix, _positions([0, 0], prefix_len), cache)
  positions = jnp.tile(jnp.asarray(prefix_len + TREE_DEPTH, jnp.int32), (2, 1))
  mask = jnp.tile(jnp.asarray(TREE_MASK), (2, 1, 1))
  tree_logits, cache = apply(model, params, batch_tree, positions, cache, mask)

  for path in PATHS.values():
    seq = jnp.concatenate([prefix, tree[:, path]], axis=1)
    expected = full_logits(model, params, seq)[0, prefix_len:]
    np.testing.assert_allclose(tree_logits[0, path], expected, atol=ATOL)

  # Row 0 accepts the path through b (3 nodes), row 1 the path through c (2 nodes, padded).
  accepted = [PATHS["b"], PATHS["c"] + PATHS["c"][-1:]]
  counts = jnp.array([3, 2], jnp.int32)
  slots = prefix_len + jnp.asarray(accepted, jnp.int32)
  cache = gather_slots(cache, slots, jnp.full((2,), prefix_len, jnp.int32))
  cache = cache.replace(lengths=prefix_len + counts)
  nxt = _tokens(8, (2, 1), model.vocab_size)
  logits, _ = apply(model, params, nxt, cache.lengths[:, None], cache)
  for row, path in enumerate(PATHS.values()):
    seq = jnp.concatenate([prefix[0], tree[0, path], nxt[row]])[None]
    np.testing.assert_allclose(logits[row, 0], full_logits(model, params, seq)[0, -1], atol=ATOL)


def test_a_token_packed_call_equals_the_dense_call_on_ragged_rows(small_config, build, apply):
  """`apply_packed`: rows with 3, 0 and 2 new tokens packed into 5 (plus 2 of padding) give the
  dense call's logits at those tokens and write the same keys and values; padding writes
  nothing. A packing that forgot the causal order within a row is caught."""
  model, params = build(small_config)
  batch, width = 3, 3
  cache = model.init_cache(batch, 16)
  _, cache = apply(model, params, _tokens(4, (batch, 6), model.vocab_size),
                   _positions([0, 0, 0], 6), cache)
  cache = cache.replace(lengths=jnp.array([6, 4, 5], jnp.int32))
  new = _tokens(5, (batch, width), model.vocab_size)
  positions = _positions(cache.lengths, width)
  dense, dense_cache = apply(model, params, new, positions, cache)
  counts = [3, 0, 2]
  rows = jnp.array([0, 0, 0, 2, 2, batch, -1], jnp.int32)  # padding: out of range either way
  offsets = jnp.array([0, 1, 2, 0, 1, 0, 2], jnp.int32)
  packed_tokens = new[jnp.minimum(rows, batch - 1), offsets][None]
  packed_positions = positions[jnp.minimum(rows, batch - 1), offsets][None]
  logits, packed_cache = model.apply_packed(params, packed_tokens, packed_positions, rows,
                                            offsets, width, cache)
  np.testing.assert_allclose(logits[0, :5], dense[rows[:5], offsets[:5]], atol=ATOL)
  np.testing.assert_array_equal(packed_cache.lengths, cache.lengths)
  for layer in range(len(cache.keys)):
    for before, got, want in ((cache.keys[layer], packed_cache.keys[layer],
                               dense_cache.keys[layer]),
                              (cache.values[layer], packed_cache.values[layer],
                               dense_cache.values[layer])):
      for row, count in enumerate(counts):
        end = int(cache.lengths[row]) + count
        np.testing.assert_allclose(got[row, :, :end], want[row, :, :end], atol=ATOL)
        np.testing.assert_array_equal(got[row, :, end:], before[row, :, end:])
  swapped = offsets.at[0].set(2).at[2].set(0)  # row 0's first and last tokens trade places
  wrong, _ = model.apply_packed(params, packed_tokens, packed_positions, rows, swapped, width,
                                cache)
  assert np.abs(wrong[0, 1] - dense[0, 1]).max() > 1e-3


def test_a_step_with_piggybacked_chunks_equals_a_step_and_separate_prefills(small_config, build,
                                                                           apply):
  """`apply_step_with_chunks`: rows 0 and 2 take a decode step while row 1 takes a chunk of 4
  prompt tokens after its 3 cached ones (and a padding chunk rides along): the step's logits and
  writes are those of a decode step, the chunk's those of a call on row 1 alone, and row 1's
  step token is written nowhere. A chunk shown its row's stale slots (length 8) is caught."""
  model, params = build(small_config)
  batch, width = 3, 4
  cache = model.init_cache(batch, 16)
  _, cache = apply(model, params, _tokens(6, (batch, 8), model.vocab_size),
                   _positions([0, 0, 0], 8), cache)
  lengths = jnp.array([8, 3, 6], jnp.int32)
  step = _tokens(7, (batch,), model.vocab_size)
  chunk = _tokens(8, (2, width), model.vocab_size)
  chunk_positions = _positions([3, 0], width)
  writes = jnp.array([True, False, True])
  step_logits, chunk_logits, mixed = model.apply_step_with_chunks(
      params, step, lengths, writes, chunk, chunk_positions, jnp.array([1, batch]),
      jnp.array([2, 0]), cache.replace(lengths=lengths))
  dense, dense_cache = apply(model, params, step[:, None], lengths[:, None],
                             cache.replace(lengths=lengths))
  row = cache.replace(keys=tuple(k[1:2] for k in cache.keys),
                      values=tuple(v[1:2] for v in cache.values), lengths=lengths[1:2])
  alone, alone_cache = apply(model, params, chunk[:1], chunk_positions[:1], row)
  np.testing.assert_allclose(step_logits[writes], dense[writes, 0], atol=ATOL)
  np.testing.assert_allclose(chunk_logits[0], alone[0, 2], atol=ATOL)
  for layer in range(len(cache.keys)):
    for before, got, step_want, chunk_want in (
        (cache.keys[layer], mixed.keys[layer], dense_cache.keys[layer], alone_cache.keys[layer]),
        (cache.values[layer], mixed.values[layer], dense_cache.values[layer],
         alone_cache.values[layer])):
      np.testing.assert_allclose(got[0::2], step_want[0::2], atol=ATOL)
      np.testing.assert_allclose(got[1, :, :7], chunk_want[0, :, :7], atol=ATOL)
      np.testing.assert_array_equal(got[1, :, 7:], before[1, :, 7:])
  leaky = model.apply_step_with_chunks(params, step, lengths, writes, chunk, chunk_positions,
                                       jnp.array([1, batch]), jnp.array([2, 0]),
                                       cache.replace(lengths=lengths.at[1].set(8)))[1]
  assert np.abs(leaky[0] - alone[0, 2]).max() > 1e-3

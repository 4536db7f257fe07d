"""EAGLE-2's dynamic draft tree: the EAGLE head grows a tree of N nodes by draft confidence.

Li et al. 2024 ("EAGLE-2: Faster Inference of Language Models with Dynamic Draft Trees"). The
head's confidence tracks a draft's chance of acceptance, so a node's path probability (the
product of the head's probabilities along its path) estimates the chance the whole path is
accepted. The tree keeps the N drafted sequences of highest path probability, grown one depth
per head call (`samplers.core.tree_growth`, the DySpec growth rule: after depth d the N slots
hold the N best sequences of at most d tokens, which is EAGLE-2's expand-then-rerank with every
frontier node expanded), and the target verifies root and N nodes in one call under a tree mask.

A round, for a row whose target cache holds every context token but the last (the root, at
context c - 1):
1. One head call appends the pairs the last verification made known (as in the chain,
   `samplers.eagle`) and gives the head's distribution of the token at c: depth 1's candidates.
2. Each of D - 1 more head calls re-feeds the tree so far from the committed pairs, under a tree
   mask (a node's pair sees the committed pairs and its ancestors' pairs only; a cache cannot
   hide stale siblings, so nothing the tree writes is kept). Node x at depth d is fed as the pair
   (f', x): f' the feature the head predicted at x's parent (the last committed pair's for
   depth 1), at position c - 2 + d. Its output ranks x's children.
3. The target scores the root and the N nodes in one call (position c - 1 + depth), returning
   their true features; `tree_walk.verify` walks the tree from the root. The accepted path's
   target cache entries are compacted to consecutive slots (`slots.compact`); the true features
   of the root and the accepted nodes are the next round's pairs.

Guarantee: children are deterministic (the head's most probable tokens), verified as point
masses, so every row's output has exactly the target's distribution at any temperature and greedy
output equals greedy AR token for token (up to numerical near-ties between batched and
single-token target calls). At T > 0 a point-mass draft is accepted with probability p(x) only,
so the tree is for greedy decoding; the sampled chain drafts from the head's own distribution.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from samplers.core import draft_verify, slots, tree_growth, tree_shape, tree_walk


def check_room(target, prompt_len: int, config) -> int:
  """Cache slots per row (P + N_new - 1 + max(nodes, D)) for the target and the head; ValueError
  when the target's max_len is smaller."""
  extra = max(config.tree_nodes, config.num_draft_tokens)
  need = prompt_len + config.max_new_tokens - 1 + extra
  draft_verify.check_room({"target": target}, need,
                          f"prompt length {prompt_len} + max_new_tokens {config.max_new_tokens} "
                          f"- 1 + max(tree_nodes, num_draft_tokens) {extra}",
                          "max_new_tokens, tree_nodes or num_draft_tokens")
  return need


def append_pending(target, target_params, features, seq, context, draft_cache, pending):
  """A round's first head call, shared by the chain and the tree: appends the pairs the last
  verification made known to the head's cache and drafts the token at `context`.

  Args:
    features: [B, D + 1, E], the first `pending` [B] of them the true features of the positions
      before the root's (the last pairs with the root); seq [B, S]; context [B] int32.
  Returns:
    (logits [B, V] of the token at context, the predicted feature [B, 1, E] it came from, the
    head's cache holding the pairs of positions below context - 1).
  """
  pending = jnp.minimum(pending, context - 1)  # finished rows only: their context stops
  start = context - 1 - pending
  positions = start[:, None] + jnp.arange(features.shape[1])
  # the token after each feature (past a row's tokens: clipped, never read)
  tokens = jnp.take_along_axis(seq, positions + 1, axis=1, mode="clip")
  # Only the last pair's outputs are drafted from; the others only enter the head's cache.
  logits, predicted, draft_cache = target.draft(target_params, features, tokens, positions,
                                                draft_cache.replace(lengths=start),
                                                rows=jnp.maximum(pending - 1, 0)[:, None])
  return logits[:, 0], predicted, draft_cache.replace(lengths=context - 1)


def make_round(target, target_params, config, keys: jax.Array, cache_slots: int):
  """The tree's `draft_verify.Round` over caches (target cache, head cache, pending features
  [B, D + 1, E], pending counts [B]): the first `pending` features are the true features of the
  positions before the root's, pairing with the tokens after them."""
  depth_max, size = config.num_draft_tokens, config.tree_nodes
  vocab = target.vocab_size
  fan = tree_growth.fan(config.tree_children, size, vocab)
  greedy = config.sampling.greedy

  def grow(features, seq, context, draft_cache, pending):
    """Appends the pending pairs to the head's cache and grows the tree (module docstring)."""
    first_logits, first_feature, committed = append_pending(
        target, target_params, features, seq, context, draft_cache, pending)
    nodes = tree_growth.grow(tree_growth.empty(context.shape[0], size),
                             tree_growth.ranking(first_logits, config.sampling), 1, fan)
    predicted = jnp.broadcast_to(first_feature, (context.shape[0], size, features.shape[-1]))
    for d in range(2, depth_max + 1):  # static: D - 1 head calls
      at_parent = jnp.take_along_axis(predicted, jnp.clip(nodes.parent, 0)[..., None], axis=1)
      fed = jnp.where((nodes.parent >= 0)[..., None], at_parent, first_feature)
      logits, predicted, _ = target.draft(
          target_params, fed, nodes.token, context[:, None] - 2 + nodes.depth, committed,
          tree_shape.ancestor_mask(nodes.parent, depth_max))
      nodes = tree_growth.grow(nodes, tree_growth.ranking(logits, config.sampling), d, fan)
    return nodes, committed

  def round_fn(caches, seq, context):
    target_cache, draft_cache, features, pending = caches
    nodes, draft_cache = grow(features, seq, context, draft_cache, pending)
    u = None
    if not greedy:  # position c + d - 1 is decided at depth d
      decided = context[:, None] + jnp.arange(depth_max + 1)
      u = draft_verify.position_uniforms(keys, decided, size + vocab)
    root = draft_verify.newest(seq, context)
    positions = jnp.concatenate([context[:, None] - 1, context[:, None] - 1 + nodes.depth], 1)
    mask = tree_shape.feed_mask(tree_shape.ancestor_mask(nodes.parent, depth_max), 1)
    logits, true_features, target_cache = target.apply_with_features(
        target_params, jnp.concatenate([root, nodes.token], axis=1), positions,
        target_cache.replace(lengths=context - 1), mask)
    count, path, emitted = tree_walk.verify(logits, nodes.token, nodes.parent, nodes.valid,
                                            depth_max, config.sampling, u)
    target_cache = slots.compact(target, target_cache, cache_slots, context[:, None] + path,
                                 context)
    along = jnp.concatenate([jnp.zeros_like(path[:, :1]), path + 1], axis=1)  # root, then path
    features = jnp.take_along_axis(true_features, along[..., None], axis=1)
    return (target_cache, draft_cache, features, count + 1), emitted, count

  return round_fn

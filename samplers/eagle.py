"""EAGLE decoding: drafts from a head that autoregresses on the target's own features.

Li et al. 2024 ("EAGLE: Speculative Sampling Requires Rethinking Feature Uncertainty"). The
target carries a draft head (`models.eagle`): given the target's feature f_t at position t (its
final normalised hidden state) and the token x_{t+1}, the head predicts the feature at t + 1,
and the target's vocabulary projection of it is the draft's distribution of x_{t+2}. Drafting
feeds the head's predicted features back in, so gamma drafts cost gamma calls of one decoder
block, with no separate draft model.

A round, for a row whose target cache holds every context token but the last (the root, at
c - 1):
1. One head call appends the pairs the last verification made known, (f_t, x_{t+1}) whose
   token x_{t+1} is the root or one of the tokens accepted before it, to the head's own
   one-layer cache, and drafts the token at c from the last of them.
2. Up to gamma - 1 more head calls each feed (predicted feature, draft) and draft the next
   token; with `confidence_threshold` a row stops after a draft the head is unsure of (EAGLE-2's
   confidence-driven drafting, along a chain), and the loop ends when every row has stopped.
3. The target scores the root and gamma draft positions in one call (a row's positions after its
   last draft are ignored), which also returns their true features, and the speculative rule
   (`draft_verify.verify_chain`) accepts a prefix of the row's drafts.
The true features of the root and of the accepted drafts are the next round's pairs; the head's
cache is rolled back past its predicted-feature entries by moving its pointer.

Guarantee: drafts are drawn from the head's distribution q (after the row's temperature / top-k
/ top-p) and verified with it, and whether a position is drafted depends on the head alone, so
every row's output has exactly the target's distribution at any temperature; greedy output
equals greedy AR token for token (up to numerical near-ties between batched and single-token
target calls). With `tree_nodes` the head drafts EAGLE-2's dynamic tree instead
(`samplers.eagle_tree`, same guarantee).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from samplers import eagle_tree
from samplers.core import draft_verify, rng
from samplers.core.logits import SamplingParams, confidence
from samplers.core.protocol import (SampleOutput, check_max_new_tokens, check_num_draft_tokens,
                                    check_probabilities, last_prompt_logits,
                                    prompt_positions)
from samplers.spec import SamplerSpec


@dataclasses.dataclass(frozen=True)
class EagleConfig:
  """Attributes:
    num_draft_tokens: gamma >= 1, the most tokens the head drafts per round.
    max_new_tokens: N, tokens generated per row at most.
    sampling: how tokens are drawn; applied identically to target and head.
    eos_id: a row stops after emitting it; None never stops early.
    pad_id: fills `SampleOutput.tokens` after a row's end.
    confidence_threshold: a row stops drafting after a draft whose head confidence (its raw max
      probability) is under this; 0 always drafts gamma. Chains only.
    tree_nodes: N > 0 drafts EAGLE-2's dynamic tree of N nodes and depth gamma
      (`samplers.eagle_tree`) instead of a chain; 0 drafts a chain.
    tree_children: candidate children per expanded tree node (0: up to N), capped by the
      vocabulary.
  """

  num_draft_tokens: int
  max_new_tokens: int
  sampling: SamplingParams = SamplingParams()
  eos_id: int | None = None
  pad_id: int = 0
  confidence_threshold: float = 0.0
  tree_nodes: int = 0
  tree_children: int = 0

  def __post_init__(self):
    check_num_draft_tokens(self.num_draft_tokens)
    check_max_new_tokens(self.max_new_tokens)
    check_probabilities(self, "confidence_threshold")
    for name, zero in (("tree_nodes", "a chain"), ("tree_children", "up to tree_nodes")):
      if getattr(self, name) < 0:
        raise ValueError(f"{name} must be >= 0 (0: {zero}), got {getattr(self, name)}")
    if self.tree_children and not self.tree_nodes:
      raise ValueError(f"tree_children={self.tree_children} shapes a tree, but tree_nodes=0 "
                       f"drafts a chain: set tree_nodes > 0 or tree_children=0")
    if 0 < self.tree_nodes < self.num_draft_tokens:
      raise ValueError(f"a tree of tree_nodes={self.tree_nodes} nodes is at most that deep, "
                       f"below its depth num_draft_tokens={self.num_draft_tokens}: set "
                       f"num_draft_tokens <= tree_nodes")
    if self.tree_nodes and self.confidence_threshold:
      raise ValueError(f"confidence_threshold ({self.confidence_threshold}) stops a chain; the "
                       f"dynamic tree (tree_nodes={self.tree_nodes}) already drafts by confidence: "
                       f"set one of them to 0")


def check_target(target, prompt_len: int, config: EagleConfig) -> int:
  """Cache slots per row, for the target and the head (a chain: P + N + gamma - 1; a tree:
  `eagle_tree.check_room`); ValueError if the target has no EAGLE head or too few slots."""
  check_head(target)
  if config.tree_nodes:
    return eagle_tree.check_room(target, prompt_len, config)
  return draft_verify.chain_room({"target": target}, prompt_len, config)


def check_head(target) -> None:
  """ValueError unless `target` carries an EAGLE draft head."""
  if not all(hasattr(target, name) for name in ("apply_with_features", "draft",
                                                "init_draft_cache")):
    raise ValueError("EAGLE decoding (sampler.kind=eagle, continuous EAGLE slots) needs a "
                     "target with an EAGLE draft head "
                     "(apply_with_features, draft, init_draft_cache; e.g. a model with "
                     "model.draft_heads.eagle=true trained on a frozen target, the pair_eagle "
                     "experiment)")


@functools.partial(jax.jit, static_argnames=("target", "config"))
def sample(target, target_params, prompt: jax.Array, prompt_lengths: jax.Array, key: jax.Array,
           config: EagleConfig) -> SampleOutput:
  """Generates up to N tokens per row after right-padded prompts with the target's EAGLE head.

  Args:
    target: a hashable causal model (static) with
      `apply_with_features(params, tokens, positions, cache, mask) -> (logits [B, T, V],
      features [B, T, E], cache)`, `init_draft_cache(batch, slots)` and
      `draft(params, features [B, T, E], tokens [B, T], positions [B, T], draft_cache, mask,
      rows=None) -> (logits [B, T, V], predicted features [B, T, E], draft_cache)`, where pair
      i is the feature at position positions[i] and the token after it, and `rows` [B, R]
      (the round's first call: the last pending pair) asks for those pairs' outputs only
      ([B, R, V], [B, R, E]) while every pair enters the cache. It may define
      `prefill_with_features` (same as apply_with_features on an empty cache, e.g.
      sequence-parallel) for the prompt's call.
    target_params: its parameters (the head's included).
    prompt: [B, P] int32 right-padded; prompt_lengths: [B] int32 in [1, P].
    key: one key, or one per row (`rng.row_keys`); randomness per position as in
      `samplers.speculative`.
    config: static `EagleConfig`.
  Returns:
    SampleOutput with tokens [B, N] and the statistics of `draft_verify.decode` (`draft_calls`
    counts head calls); a chain's are those of ragged drafts (`mean_draft_length`,
    `draft_calls_saved`).
  Raises:
    ValueError: the target has no EAGLE head, or its max_len is below `check_target`'s slots.
  """
  batch, prompt_len = prompt.shape
  gamma = config.num_draft_tokens
  slots = check_target(target, prompt_len, config)
  keys = rng.row_keys(key, batch)
  prompt_lengths = prompt_lengths.astype(jnp.int32)
  round_fn = lambda caches, seq, context, active: chain_round(
      target, target_params, keys, caches, seq, context, active, gamma, config.sampling,
      config.confidence_threshold)
  logits, caches = prefill_with_head(target, target_params, prompt, prompt_lengths, slots,
                                     gamma + 1)
  first_logits = last_prompt_logits(logits, prompt_lengths)
  if config.tree_nodes:
    tree_round = eagle_tree.make_round(target, target_params, config, keys, slots)
    return draft_verify.decode(tree_round, caches, first_logits, prompt, prompt_lengths, keys,
                               config)
  return draft_verify.decode(round_fn, caches, first_logits, prompt, prompt_lengths, keys, config,
                             ragged_drafts=True)


def prefill_with_head(target, target_params, prompt: jax.Array, prompt_lengths: jax.Array,
                      cache_len: int, width: int) -> tuple[jax.Array, tuple]:
  """The prompt's call: the target's prefill with features, the head reading the prompt's pairs
  (f_t, x_{t+1}), t < P - 1 (pairs past a row's prompt are overwritten before they are read),
  and the last prompt token's feature waiting for the first generated token.

  Args:
    prompt: [B, P] int32 right-padded; prompt_lengths: [B] int32 in [1, P].
    cache_len: slots per row of both caches; width: W >= gamma + 1, the waiting features' room.
  Returns:
    (logits [B, P, V], caches (target cache, head cache, features [B, W, E], pending [B] = 1)),
    the caches `chain_round` takes.
  """
  batch, prompt_len = prompt.shape
  prefill = getattr(target, "prefill_with_features", target.apply_with_features)
  logits, features, target_cache = prefill(target_params, prompt, prompt_positions(prompt),
                                           target.init_cache(batch, cache_len))
  head = target.init_draft_cache(batch, cache_len)
  if prompt_len > 1:
    _, _, head = target.draft(target_params, features[:, :-1], prompt[:, 1:],
                              prompt_positions(prompt)[:, :-1], head)
  last = jnp.take_along_axis(features, (prompt_lengths - 1)[:, None, None], axis=1)
  waiting = jnp.zeros((batch, width, features.shape[-1]), features.dtype).at[:, :1].set(last)
  return logits, (target_cache, head, waiting, jnp.ones((batch,), jnp.int32))


def chain_round(target, target_params, keys: jax.Array, caches: tuple, seq: jax.Array,
                context: jax.Array, active: jax.Array, gamma: int, sampling: SamplingParams,
                confidence_threshold: float = 0.0):
  """One EAGLE chain round (module docstring) for rows whose target cache holds every context
  token but the last; a `draft_verify.RaggedRound`.

  Args:
    keys: [B] per-row keys (the round's randomness, `draft_verify.round_noise`).
    caches: (target cache, head cache holding the pairs of positions below context - 1 -
      pending, features [B, W, E] (W >= gamma + 1) whose first `pending` [B] are the true
      features of the positions after them: the last, f_{c-2}, pairs with the root x_{c-1}).
    seq: [B, S] int32 tokens; context: [B] int32; active: [B] bool rows still decoding.
  Returns:
    (caches after the round (the verified positions' true features waiting, pending = accepted
    + 1), emitted [B, gamma + 1], accepted [B], drafted [B] in [1, gamma], head calls []).
  """
  target_cache, head, features, pending = caches
  noise, verify_u = draft_verify.round_noise(keys, context, gamma, target.vocab_size,
                                             sampling.greedy)
  first_logits, first_feature, head = eagle_tree.append_pending(
      target, target_params, features, seq, context, head, pending)

  def feed(i, fed, carry):  # feeds (f' of position c + i - 2, drafts[i - 1]), drafts c + i
    cache, feature = carry
    logits, feature, cache = target.draft(target_params, feature, fed,
                                          (context + i - 2)[:, None], cache)
    return logits[:, 0], (cache, feature)

  stops = lambda logits, carry: (confidence(logits) < confidence_threshold, carry)
  s, (head, _) = draft_verify.draft_chain(first_logits, (head, first_feature), feed, stops,
                                          noise, active, gamma, sampling)
  window = context[:, None] - 1 + jnp.arange(gamma + 1)
  scored = jnp.concatenate([draft_verify.newest(seq, context), s["drafts"]], axis=1)
  logits, verified, target_cache = target.apply_with_features(
      target_params, scored, window, target_cache.replace(lengths=context - 1))
  emitted, count = draft_verify.verify_chain(s["drafts"], s.get("q"), logits, verify_u,
                                             sampling, s["lengths"])
  room = features.shape[1] - (gamma + 1)
  waiting = jnp.pad(verified, ((0, 0), (0, room), (0, 0))).astype(features.dtype)
  return (target_cache, head, waiting, count + 1), emitted, count, s["lengths"], s["calls"]


@dataclasses.dataclass(frozen=True)
class EagleOptions:
  """`sampler.*` settings of kind "eagle" (no second model: the target carries the head,
  `model.draft_heads.eagle=true`).

  Attributes:
    num_draft_tokens: gamma, the most tokens the head drafts per target call.
    confidence_threshold: a row stops drafting after a draft the head is less sure of (EAGLE-2's
      observation: the head's confidence tracks the draft's chance of acceptance); 0 drafts
      gamma every round.
    tree_nodes: N > 0 drafts EAGLE-2's dynamic tree of N nodes, depth num_draft_tokens, instead
      of a chain (greedy decoding's choice where a call's width is cheap; `samplers.eagle_tree`).
    tree_children: candidate children per expanded tree node (0: up to tree_nodes).
  """

  num_draft_tokens: int = 4
  confidence_threshold: float = 0.0
  tree_nodes: int = 0
  tree_children: int = 0


SPEC = SamplerSpec(
    "eagle", EagleOptions, sample,
    lambda o, decode: EagleConfig(o.num_draft_tokens,
                                  confidence_threshold=o.confidence_threshold,
                                  tree_nodes=o.tree_nodes, tree_children=o.tree_children,
                                  **decode.common()),
    model="eagle", slack=lambda o: max(o.num_draft_tokens, o.tree_nodes))

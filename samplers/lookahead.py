"""Lookahead decoding: a Jacobi lookahead branch fills an n-gram pool whose matches are verified in
the same target call.

Fu et al. 2024 ("Break the Sequential Dependency of LLM Inference Using Lookahead Decoding").
Each target call feeds the row's last committed token (the root) and two kinds of branches, all
under one tree attention mask (each token sees the committed prefix and its own branch):

- the lookahead branch: a window of W Jacobi guesses g_1..g_W (`samplers.jacobi`). The target's
  greedy output o_j after g_j becomes a guess of the next window (the Jacobi update shifts the
  outputs past the tokens committed this call). Each guess remembers the N - 2 tokens it was
  predicted after, one per earlier call (its trajectory: the paper's N - 1 window levels), so
  (trajectory of g_j, g_j, o_j) is an n-gram in which every token is the target's prediction
  after the one before it; those W n-grams enter the row's pool (`samplers.core.ngram_pool`).
  The paper scores all levels in every call; here the levels are earlier calls' windows, so a
  call scores 1 + W + G (N - 1) tokens instead of 1 + W (N - 1) + G (N - 1).
- the verification branch: the G newest pooled n-grams that start with the root, each a chain
  of N - 1 draft tokens. With `text_ngrams` the pool also holds the n-grams of the row's own
  text, so repeated text is drafted as in prompt lookup (`samplers.prompt_lookup`).

Greedy verification takes the branch (the window counts as one) whose leading tokens the
target's argmaxes confirm the longest, plus the target's token after it. Sampled verification
walks the branches as a token tree with recursive rejection (`samplers.core.tree_walk.walk`);
every draft is a deterministic function of the row's past, so its q is one-hot.

Guarantee: every row's output has exactly the target's sampling distribution at any
temperature, and greedy decoding equals greedy AR token for token (up to numerical near-ties
between batched and single-token target calls).
"""

from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from samplers.core import draft_verify, ngram_pool, rng, slots, tree_shape, tree_walk
from samplers.core.logits import SamplingParams
from samplers.core.protocol import (CausalModel, SampleOutput, check_max_new_tokens,
                                    last_prompt_logits, prefill)
from samplers.spec import SamplerSpec


@dataclasses.dataclass(frozen=True)
class LookaheadConfig:
  """Attributes:
    window: W >= 1, Jacobi guesses in the lookahead branch.
    ngram: N >= 2, the pool's n-gram size (a candidate drafts N - 1 tokens).
    candidates: G >= 1, pooled n-grams verified per call.
    pool_size: n-grams kept per row (the oldest are overwritten).
    text_ngrams: the pool also takes the n-grams of the row's own text (its prompt, then each
      committed token's), as prompt lookup drafts from it.
    max_new_tokens: N_new, tokens generated per row at most.
    sampling: how tokens are drawn.
    eos_id: a row stops after emitting it; None never stops early.
    pad_id: fills `SampleOutput.tokens` after a row's end.
  """

  window: int
  ngram: int
  candidates: int
  max_new_tokens: int
  pool_size: int = 128
  text_ngrams: bool = True
  sampling: SamplingParams = SamplingParams()
  eos_id: int | None = None
  pad_id: int = 0

  def __post_init__(self):
    if self.window < 1 or self.candidates < 1 or self.pool_size < 1:
      raise ValueError(f"window, candidates and pool_size must be >= 1, got window="
                       f"{self.window}, candidates={self.candidates}, pool_size={self.pool_size}")
    if self.ngram < 2:
      raise ValueError(f"ngram must be >= 2 (a first token and a draft), got {self.ngram}")
    check_max_new_tokens(self.max_new_tokens)

  @property
  def num_draft_tokens(self) -> int:
    """The longest branch: tokens a call may accept before its last (the decode loop's gamma)."""
    return max(self.window, self.ngram - 1)

  @property
  def num_nodes(self) -> int:
    return self.window + self.candidates * (self.ngram - 1)


@functools.cache
def branches(window: int, chain: int, count: int):
  """The static tree of one window chain and `count` chains of `chain` tokens under the root.

  Returns (parent [M] int32, -1 for a branch's first node; depth [M] int32 from 1; ancestors
  [M, M] bool; nodes [1 + count, D] int32: each branch's nodes root-down, -1 past its end).
  """
  lengths = [window] + [chain] * count
  depth_max = max(lengths)
  parent, depth, nodes = [], [], []
  for length in lengths:
    start = len(parent)
    parent += [-1] + [start + k for k in range(length - 1)]
    depth += list(range(1, length + 1))
    nodes.append(list(range(start, start + length)) + [-1] * (depth_max - length))
  parent = np.asarray(parent, np.int32)
  return (parent, np.asarray(depth, np.int32), tree_shape.ancestor_mask(parent, depth_max),
          np.asarray(nodes, np.int32))


def longest_branch(top: jax.Array, tokens: jax.Array, valid: jax.Array, parent: np.ndarray,
                   nodes: np.ndarray):
  """Greedy verification of one row's branches: the branch with the most leading drafts equal to
  the target's argmax (the first such branch on ties).

  Args:
    top: [1 + M] int32 the target's argmax after the root and after each node.
    tokens, valid: [M] the drafted tokens and which exist; parent, nodes: from `branches`.
  Returns:
    (accepted count [] int32, last token [] int32, path [D] int32 the accepted nodes, zeros past
    the count): what `tree_walk.greedy_walk` returns for the best branch.
  """
  inside = nodes >= 0
  node = np.where(inside, nodes, 0)
  match = inside & valid[node] & (tokens[node] == top[parent[node] + 1])  # [1 + G, D]
  accepted = jnp.sum(jnp.cumprod(match, axis=1), axis=1)
  best = jnp.argmax(accepted)
  count = accepted[best].astype(jnp.int32)
  path = jnp.where(jnp.arange(node.shape[1]) < count, jnp.asarray(node)[best], 0)
  last = top[jnp.where(count > 0, path[jnp.maximum(count - 1, 0)] + 1, 0)]
  return count, last, path.astype(jnp.int32)


@flax.struct.dataclass
class Lookahead:
  """The lookahead state a decode carries beside the cache.

  Attributes:
    trajectories: [B, W, N - 1] int32; [:, j, -1] is window guess g_j, [:, j, :-1] the tokens
      it was predicted after (oldest first).
    pool: the row's n-grams.
    seen: [B] int32 the row's text below this position is in the pool (with text_ngrams).
  """

  trajectories: jax.Array
  pool: ngram_pool.NgramPool
  seen: jax.Array


@functools.partial(jax.jit, static_argnames=("target", "config"))
def sample(target: CausalModel, target_params, prompt: jax.Array, prompt_lengths: jax.Array,
           key: jax.Array, config: LookaheadConfig) -> SampleOutput:
  """Generates up to N tokens per row after right-padded prompts by lookahead decoding.

  Args:
    target: a hashable `CausalModel` (static); target_params: its parameters.
    prompt: [B, P] int32 right-padded; prompt_lengths: [B] int32 in [1, P].
    key: one key, or one per row (`rng.row_keys`). The position decided at depth d of a call is
      verified with its `draft_verify.position_uniforms` of width M + V (M tree nodes).
    config: static `LookaheadConfig`.
  Returns:
    SampleOutput with tokens [B, N] and the statistics of `draft_verify.decode` without
    `draft_calls` (there is no draft model; `drafted_tokens` counts D per row and call).
  Raises:
    ValueError: if P + N - 1 + M exceeds the target's max_len.
  """
  batch, prompt_len = prompt.shape
  vocab, size = target.vocab_size, config.num_nodes
  depth_max, window, n = config.num_draft_tokens, config.window, config.ngram
  cache_slots = prompt_len + config.max_new_tokens - 1 + size
  draft_verify.check_room({"target": target}, cache_slots,
                          f"prompt length {prompt_len} + max_new_tokens {config.max_new_tokens} - "
                          f"1 + window {window} + candidates {config.candidates} x (ngram {n} - 1)",
                          "max_new_tokens, window or candidates")
  parent, depth, ancestors, nodes = branches(window, n - 1, config.candidates)
  mask = jnp.broadcast_to(tree_shape.feed_mask(ancestors, 1), (batch, 1 + size, 1 + size))
  keys = rng.row_keys(key, batch)
  prompt_lengths = prompt_lengths.astype(jnp.int32)

  def round_fn(caches, seq, context):
    cache, state = caches
    pool = state.pool
    if config.text_ngrams:  # the n-grams ending at the tokens committed since the last call
      ends = state.seen[:, None] + jnp.arange(depth_max + 1)[None, :]
      pool = ngram_pool.insert(pool, *ngram_pool.ending_at(seq, ends, n, context))
    root = draft_verify.newest(seq, context)  # [B, 1]
    drafts, found = ngram_pool.select(pool, root[:, 0], config.candidates)
    guesses = state.trajectories[:, :, -1]
    tokens = jnp.concatenate([guesses, drafts.reshape(batch, -1)], axis=1)  # [B, M]
    valid = jnp.concatenate([jnp.ones((batch, window), bool), jnp.repeat(found, n - 1, 1)], 1)
    positions = context[:, None] - 1 + jnp.concatenate([jnp.zeros(1, jnp.int32), depth])
    logits, cache = target.apply(target_params, jnp.concatenate([root, tokens], axis=1),
                                 positions, cache.replace(lengths=context - 1), mask)
    top = jnp.argmax(logits.astype(jnp.float32), axis=-1).astype(jnp.int32)  # [B, 1 + M]
    if config.sampling.greedy:  # the longest confirmed branch (a walk would take the first)
      walk = functools.partial(longest_branch, parent=parent, nodes=nodes)
      count, last, path = jax.vmap(walk)(top, tokens, valid)
      emitted = tree_walk.emitted_along(tokens, count, last, path)
    else:
      decided = context[:, None] + jnp.arange(depth_max + 1)
      u = draft_verify.position_uniforms(keys, decided, size + vocab)
      count, path, emitted = tree_walk.verify(logits, tokens, jnp.asarray(parent), valid,
                                              depth_max, config.sampling, u)
    cache = slots.compact(target, cache, cache_slots, context[:, None] + path, context)
    outputs = top[:, 1:window + 1, None]  # [B, W, 1] o_j, the prediction after guess g_j
    grams = jnp.concatenate([state.trajectories, outputs], axis=2)  # [B, W, N]
    # Jacobi update: guess j of the next call is o_{j + count} (committed tokens skipped)
    moved = jnp.clip(count[:, None] + jnp.arange(window)[None, :], 0, window - 1)[:, :, None]
    state = Lookahead(trajectories=jnp.take_along_axis(grams[:, :, 1:], moved, axis=1),
                      pool=ngram_pool.insert(pool, grams), seen=context)
    return (cache, state), emitted, count

  logits, cache = prefill(target, target_params, prompt, target.init_cache(batch, cache_slots))
  # the first window: the prompt's last W tokens (the paper seeds it from the prompt too)
  seed = jnp.clip(prompt_lengths[:, None] - window + jnp.arange(window)[None, :], 0, None)
  first = jnp.take_along_axis(prompt, seed, axis=1)[:, :, None]
  pool = ngram_pool.empty(batch, config.pool_size, n)
  if config.text_ngrams:
    ends = jnp.broadcast_to(jnp.arange(prompt_len), prompt.shape)
    pool = ngram_pool.insert(pool, *ngram_pool.ending_at(prompt, ends, n, prompt_lengths))
  state = Lookahead(trajectories=jnp.broadcast_to(first, (batch, window, n - 1)), pool=pool,
                    seen=prompt_lengths)
  out = draft_verify.decode(round_fn, (cache, state), last_prompt_logits(logits, prompt_lengths),
                            prompt, prompt_lengths, keys, config)
  return out.replace(stats={k: v for k, v in out.stats.items() if k != "draft_calls"})


@dataclasses.dataclass(frozen=True)
class LookaheadOptions:
  """`sampler.*` settings of kind "lookahead" (no second model). The defaults suit a small model
  on a CPU, where every extra token in a call costs; an accelerator affords a wider window and
  more candidates (the paper uses W = 15, N = 5, G = 15 on a 7B model).

  Attributes:
    window: W, Jacobi guesses in the lookahead branch.
    ngram: N, the n-gram size of the pool (candidates draft N - 1 tokens); 2 <= N <= W + 1.
    candidates: G, pooled n-grams verified per target call.
    pool_size: n-grams kept per row.
    text_ngrams: the pool also takes the n-grams of the row's own text (prompt and output).
  """

  window: int = 1
  ngram: int = 5
  candidates: int = 2
  pool_size: int = 128
  text_ngrams: bool = True


SPEC = SamplerSpec(
    "lookahead", LookaheadOptions, sample,
    lambda o, decode: LookaheadConfig(window=o.window, ngram=o.ngram, candidates=o.candidates,
                                      pool_size=o.pool_size, text_ngrams=o.text_ngrams,
                                      **decode.common()),
    slack=lambda o: o.window + o.candidates * (o.ngram - 1) - 1)

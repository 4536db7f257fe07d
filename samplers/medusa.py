"""Medusa decoding: a token tree drafted by the target's own extra heads, verified in one call.

Cai et al. 2024 ("Medusa: Simple LLM Inference Acceleration Framework with Multiple Decoding
Heads"). The target carries K heads (`models.medusa`): at position t, head k predicts the token
at t + 1 + k. So the call that scores a row's last accepted token also drafts the next round:
with y the token the row emits after it, head 1 proposes the token after y, head 2 the one after
that, and so on. A static tree (branching b_1, ..., b_D, D <= K) takes b_d tokens from head d at
depth d (its top ones when greedy, distinct draws from it when sampling), under every node of
depth d - 1 (the heads do not see the tree, so every parent gets the same children). The target scores the root y and the tree in one call with a tree
attention mask, the verifier walks it from the root (`samplers.core.tree_walk`), the cache keeps
the accepted path, and the heads at the path's last node draft the next tree. One target call per
round, no draft model.

Guarantee: greedy children are the heads' top tokens, verified as point masses; sampled children
are distinct draws from the heads' distributions, each verified with the law it was drawn from
given its earlier siblings (recursive rejection, SpecInfer). Every row's output therefore has
exactly the target's distribution at any temperature, and greedy output equals greedy AR token for token (up to
numerical near-ties between batched and single-token target calls). Medusa's "typical
acceptance", which is faster and lossy, is not implemented.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from samplers.core import draft_verify, rng, slots, tree_shape, tree_walk, verify
from samplers.core.logits import SamplingParams, probs
from samplers.core.protocol import SampleOutput, check_max_new_tokens, last_prompt_logits
from samplers.spec import SamplerSpec


@dataclasses.dataclass(frozen=True)
class MedusaConfig:
  """Attributes:
    branching: children per node at each depth, e.g. (3, 2, 1); depth d takes head d's top b_d.
    max_new_tokens: N, tokens generated per row at most.
    sampling: how tokens are drawn.
    eos_id: a row stops after emitting it; None never stops early.
    pad_id: fills `SampleOutput.tokens` after a row's end.
  """

  branching: tuple[int, ...]
  max_new_tokens: int
  sampling: SamplingParams = SamplingParams()
  eos_id: int | None = None
  pad_id: int = 0

  def __post_init__(self):
    object.__setattr__(self, "branching", tree_shape.validate(self.branching))
    check_max_new_tokens(self.max_new_tokens)

  @property
  def num_draft_tokens(self) -> int:
    """D, the tree's depth: tokens a round may accept before its last."""
    return len(self.branching)

  @property
  def num_nodes(self) -> int:
    return tree_shape.static_tree(self.branching).num_nodes


def check_target(target, prompt_len: int, config: MedusaConfig) -> int:
  """Cache slots per row (P + N - 1 + nodes); ValueError if the target cannot run the tree."""
  heads = getattr(target, "num_medusa_heads", 0)
  if not hasattr(target, "apply_with_heads") or heads < 1:
    raise ValueError("sampler.kind=medusa needs a target with Medusa heads (apply_with_heads; "
                     "e.g. a model with model.draft_heads.medusa=K trained on a frozen target, "
                     "the pair_medusa experiment)")
  if len(config.branching) > heads:
    raise ValueError(f"the tree's depth {len(config.branching)} (branching {config.branching}) "
                     f"exceeds the target's {heads} Medusa heads; one head drafts each depth")
  if max(config.branching) > target.vocab_size:
    raise ValueError(f"tree spec malformed: branching factor {max(config.branching)} exceeds "
                     f"vocab_size {target.vocab_size}")
  need = prompt_len + config.max_new_tokens - 1 + config.num_nodes
  draft_verify.check_room({"target": target}, need,
                          f"prompt length {prompt_len} + max_new_tokens {config.max_new_tokens} "
                          f"- 1 + tree nodes {config.num_nodes}", "max_new_tokens or the tree size")
  return need


def tree_tokens(heads: jax.Array, branching: tuple[int, ...], sampling: SamplingParams,
                noise: jax.Array | None = None) -> tuple[jax.Array, jax.Array | None]:
  """Each row's tree from the heads' logits heads [B, K, V], in `tree_shape.static_tree` order.

  Greedy: the node at depth d that is its parent's i-th child holds head d's i-th top token.
  Sampled: depth d's b_d children are distinct draws from head d's distribution q_d (after the
  row's temperature / top-k / top-p; Gumbel top-b with uniforms noise [B, D, V]), the same under
  every parent of depth d - 1 (the walk visits one), and child i's law given the earlier ones
  is q_d without them, renormalised (`verify.without_replacement`).
  Returns (tokens [B, N] int32, qs [B, N, V] the laws the nodes were drawn from, None when
  greedy: verification then treats them as point masses).
  """
  tree = tree_shape.static_tree(branching)
  tokens, qs = [], []
  for d, (size, b) in enumerate(zip(tree.level_sizes, branching)):
    sibling = np.arange(size) % b
    if sampling.greedy:
      tokens.append(jax.lax.top_k(heads[:, d], b)[1][:, sibling])
      continue
    q = probs(heads[:, d], sampling)  # [B, V]
    children = jax.lax.top_k(jnp.log(q) - jnp.log(-jnp.log(noise[:, d])), b)[1]  # [B, b]
    laws = jax.vmap(verify.without_replacement)(q, children, jnp.ones(children.shape, bool))
    tokens.append(children[:, sibling])
    qs.append(laws[:, sibling])
  tokens = jnp.concatenate(tokens, axis=1).astype(jnp.int32)
  return tokens, (None if sampling.greedy else jnp.concatenate(qs, axis=1))


@functools.partial(jax.jit, static_argnames=("target", "config"))
def sample(target, target_params, prompt: jax.Array, prompt_lengths: jax.Array, key: jax.Array,
           config: MedusaConfig) -> SampleOutput:
  """Generates up to N tokens per row after right-padded prompts with Medusa heads.

  Args:
    target: a hashable causal model with `apply_with_heads(params, tokens, positions, cache,
      mask) -> (logits [B, T, V], heads [B, T, K, V], cache)` and `num_medusa_heads` (static).
    target_params: its parameters (the heads' included).
    prompt: [B, P] int32 right-padded; prompt_lengths: [B] int32 in [1, P].
    key: one key, or one per row (`rng.row_keys`); the position decided at depth d is verified
      with its `draft_verify.position_uniforms` of width N + V (N tree nodes).
    config: static `MedusaConfig`.
  Returns:
    SampleOutput with tokens [B, N] and the statistics of `draft_verify.decode` without
    `draft_calls` (the heads run inside the target's calls; `drafted_tokens` counts D per row
    and round, `acceptance` is accepted tokens per depth offered).
  Raises:
    ValueError: the target has no (or too few) heads, or P + N - 1 + nodes exceeds max_len.
  """
  batch, prompt_len = prompt.shape
  branching = config.branching
  cache_slots = check_target(target, prompt_len, config)
  tree = tree_shape.static_tree(branching)
  size, depth_max, vocab = tree.num_nodes, len(branching), target.vocab_size
  mask = jnp.broadcast_to(tree_shape.feed_mask(tree.ancestors, 1), (batch, 1 + size, 1 + size))
  parent, valid = jnp.asarray(tree.parent), jnp.ones((batch, size), bool)
  keys = rng.row_keys(key, batch)
  prompt_lengths = prompt_lengths.astype(jnp.int32)

  def round_fn(caches, seq, context):
    """The cache holds all of the row's `context` tokens but the last (the root); `heads`
    [B, K, V] are the heads' logits at the token before the root."""
    cache, heads = caches
    u = None
    if not config.sampling.greedy:  # position context + d - 1 draws depth d and verifies it
      decided = context[:, None] + jnp.arange(depth_max + 1)
      u = draft_verify.position_uniforms(keys, decided, vocab + size + vocab)
    tokens, qs = tree_tokens(heads, branching, config.sampling,
                             None if u is None else u[:, :depth_max, :vocab])
    root = draft_verify.newest(seq, context)
    positions = context[:, None] - 1 + jnp.concatenate([jnp.zeros(1, jnp.int32), tree.depth])
    logits, all_heads, cache = target.apply_with_heads(
        target_params, jnp.concatenate([root, tokens], axis=1), positions,
        cache.replace(lengths=context - 1), mask)
    count, path, emitted = tree_walk.verify(logits, tokens, parent, valid, depth_max,
                                            config.sampling, None if u is None else u[..., vocab:],
                                            qs)
    cache = slots.compact(target, cache, cache_slots, context[:, None] + path, context)
    last_node = jnp.where(count > 0, jnp.take_along_axis(path, jnp.maximum(count - 1, 0)[:, None],
                                                         axis=1)[:, 0] + 1, 0)
    heads = jnp.take_along_axis(all_heads, last_node[:, None, None, None], axis=1)[:, 0]
    return (cache, heads), emitted, count

  positions = jnp.broadcast_to(jnp.arange(prompt_len, dtype=jnp.int32), prompt.shape)
  logits, heads, cache = target.apply_with_heads(target_params, prompt, positions,
                                                 target.init_cache(batch, cache_slots))
  last = (prompt_lengths - 1)[:, None, None, None]
  out = draft_verify.decode(round_fn, (cache, jnp.take_along_axis(heads, last, axis=1)[:, 0]),
                            last_prompt_logits(logits, prompt_lengths), prompt, prompt_lengths,
                            keys, config)
  return out.replace(stats={k: v for k, v in out.stats.items() if k != "draft_calls"})


@dataclasses.dataclass(frozen=True)
class MedusaOptions:
  """`sampler.*` settings of kind "medusa" (no second model: the target carries the heads,
  `model.draft_heads.medusa=K`).

  Attributes:
    branching: children per node at each depth (depth d from head d's top tokens); its length
      is at most K. The default chain suits a CPU, where every token of a call costs; an
      accelerator affords the paper's wider trees, e.g. (3, 2, 2, 1).
  """

  branching: tuple[int, ...] = (1, 1, 1, 1)


SPEC = SamplerSpec(
    "medusa", MedusaOptions, sample,
    lambda o, decode: MedusaConfig(branching=tuple(o.branching), **decode.common()),
    model="medusa", slack=lambda o: tree_shape.static_tree(tuple(o.branching)).num_nodes - 1)

"""Token-tree speculative sampling: static trees (SpecInfer, Miao et al. 2024, "SpecInfer:
Accelerating Large Language Model Serving with Tree-based Speculative Inference and
Verification"; EAGLE, Li et al. 2024) and dynamic trees grown greedily by draft probability under
a node budget (DySpec, Xiong et al. 2024, "DySpec: Faster Speculative Decoding with Dynamic Token
Tree Structure").

Each round the draft grows a tree of N candidate tokens below the row's last committed token (the
root), one draft call per depth; each call re-feeds the tree so far from the committed prefix with
a tree attention mask (each node sees the prefix and its ancestors), since a cache cannot hide
stale siblings from later calls. The target scores the root and all N nodes in ONE call with the
same mask; a node's position id is the root's plus its depth (slot index and position differ).
From the root, the verifier walks down: at each node it runs recursive rejection over the
children (`verify.recursive_rejection`: accept c_j with probability min(1, p_cur(c_j) /
q_j(c_j)), else p_cur <- norm(max(0, p_cur - q_j))), descends into an accepted child, and ends
with a token from p_cur at the first node whose children are all rejected (or a leaf). Children:

- static, "iid": b i.i.d. draws from the draft's q at the parent (q_j = q);
- static, "without_replacement": b distinct draws (Gumbel top-b; q_j = q without the earlier
  siblings, renormalised);
- static, "top", every greedy tree, and every dynamic tree: deterministic children (top-b by
  draft probability, or DySpec's growth), verified as point masses (accept c_j with
  probability p_cur(c_j), else remove it from p_cur).

Guarantee: every row's output has exactly the target's distribution (`samplers.ar`), since the
tree's randomness is the draft's own and each q_j is exactly the law c_j was drawn from given
what was tried before. Greedy output equals greedy AR token for token (up to numerical near-ties
between batched and single-token calls).

Caches: at a round's start with context c, the target holds tokens 0..c-2 and the draft
0..c-3 (it re-reads the last two, as in `speculative`). The verify call writes the root at slot
c-1 and node j at slot c+j; the accepted path's nodes are then copied to slots c, c+1, ...
(`slots.compact`, generic over the cache pytree), in the target's and in the draft's cache (whose
last call held every node above the deepest level), so neither model is called again.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from samplers.core import draft_verify, rng, slots, tree_growth, tree_shape, tree_walk, verify
from samplers.core.logits import SamplingParams, probs, process_logits
from samplers.core.protocol import CausalModel, SampleOutput, check_max_new_tokens, check_vocabularies
from samplers.spec import SamplerSpec

CHILDREN = ("iid", "without_replacement", "top")


@dataclasses.dataclass(frozen=True)
class TreeConfig:
  """A static tree.

  Attributes:
    branching: children per node at each depth, e.g. (2, 2, 1) (see `tree_shape`); D = its length.
    max_new_tokens: N, tokens generated per row at most.
    sampling: how tokens are drawn; applied identically to target and draft.
    children: "iid", "without_replacement" or "top" (see the module docstring); greedy sampling
      always uses "top".
    eos_id: a row stops after emitting it; None never stops early.
    pad_id: fills `SampleOutput.tokens` after a row's end.
  """

  branching: tuple[int, ...]
  max_new_tokens: int
  sampling: SamplingParams = SamplingParams()
  children: str = "iid"
  eos_id: int | None = None
  pad_id: int = 0

  def __post_init__(self):
    object.__setattr__(self, "branching", tree_shape.validate(self.branching))
    if self.children not in CHILDREN:
      raise ValueError(f"children must be one of {CHILDREN}, got {self.children!r}")
    check_max_new_tokens(self.max_new_tokens)

  @property
  def num_draft_tokens(self) -> int:
    """D, the most drafts a round accepts (`draft_verify.decode`'s gamma; D draft calls)."""
    return len(self.branching)

  @property
  def num_nodes(self) -> int:
    return tree_shape.static_tree(self.branching).num_nodes


@dataclasses.dataclass(frozen=True)
class DynamicTreeConfig:
  """A dynamic tree (DySpec): the node_budget draft sequences of highest draft path probability
  among those of at most max_depth tokens, grown one depth per draft call.

  Attributes:
    node_budget: N >= 1 tree nodes per round.
    max_depth: D >= 1.
    max_new_tokens, sampling, eos_id, pad_id: as in `TreeConfig`.
    max_children: candidate children per expanded node (0: up to N), capped by the vocabulary.
  """

  node_budget: int
  max_depth: int
  max_new_tokens: int
  sampling: SamplingParams = SamplingParams()
  eos_id: int | None = None
  pad_id: int = 0
  max_children: int = 0

  def __post_init__(self):
    if self.node_budget < 1:
      raise ValueError(f"tree spec malformed: node_budget must be >= 1, got {self.node_budget}")
    if self.max_depth < 1:
      raise ValueError(f"tree spec malformed: max_depth must be >= 1, got {self.max_depth}")
    if self.max_children < 0:
      raise ValueError(f"tree spec malformed: max_children must be >= 0 (0 = up to node_budget), "
                       f"got {self.max_children}")
    check_max_new_tokens(self.max_new_tokens)

  @property
  def num_draft_tokens(self) -> int:
    return self.max_depth

  @property
  def num_nodes(self) -> int:
    return self.node_budget


def _check(target: CausalModel, draft: CausalModel, prompt_len: int, config) -> int:
  """Cache slots per row a decode needs (P + N - 1 + nodes); ValueError if the pair can't."""
  check_vocabularies(target, draft, ("target", "draft"))
  if isinstance(config, TreeConfig) and (config.children != "iid" or config.sampling.greedy):
    widest = max(config.branching)
    if widest > target.vocab_size:
      raise ValueError(f"tree spec malformed: branching factor {widest} exceeds vocab_size "
                       f"{target.vocab_size}; distinct children need branching <= vocab_size")
  need = prompt_len + config.max_new_tokens - 1 + config.num_nodes
  draft_verify.check_room({"target": target, "draft": draft}, need,
                          f"prompt length {prompt_len} + max_new_tokens {config.max_new_tokens} "
                          f"- 1 + tree nodes {config.num_nodes}", "max_new_tokens or the tree size")
  return need


def _gumbel(q: jax.Array, u: jax.Array) -> jax.Array:
  """log q + Gumbel noise from uniforms u (same shape [..., V]); argmax is a draw from q."""
  return jnp.log(q) - jnp.log(-jnp.log(u))


def _children(logits: jax.Array, b: int, noise: jax.Array, config: TreeConfig):
  """b children of each of n parents from the draft's logits [B, n, V] at the parents.

  Args:
    noise: [B, W] the depth's draft uniforms (n b V for "iid", n V for "without_replacement").
  Returns:
    (tokens [B, n b] int32, qs [B, n b, V] the law each was drawn from given its earlier
    siblings, valid [B, n b] bool); parent-major order.
  """
  batch, n, vocab = logits.shape
  q = probs(logits, config.sampling)
  mode = "top" if config.sampling.greedy else config.children
  if mode == "iid":
    u = noise[:, :n * b * vocab].reshape(batch, n, b, vocab)
    tokens = jnp.argmax(_gumbel(q[:, :, None], u), axis=-1)
    qs, valid = jnp.broadcast_to(q[:, :, None], (batch, n, b, vocab)), jnp.ones(tokens.shape, bool)
  elif mode == "without_replacement":
    values, tokens = jax.lax.top_k(_gumbel(q, noise[:, :n * vocab].reshape(batch, n, vocab)), b)
    valid = values > -jnp.inf
    qs = jax.vmap(jax.vmap(verify.without_replacement))(q, tokens, valid)
  else:
    scores = logits.astype(jnp.float32) if config.sampling.greedy else process_logits(
        logits, config.sampling)
    values, tokens = jax.lax.top_k(scores, b)
    valid = values > -jnp.inf
    qs = jax.nn.one_hot(tokens, vocab, dtype=jnp.float32)
  return (tokens.reshape(batch, n * b).astype(jnp.int32), qs.reshape(batch, n * b, vocab),
          valid.reshape(batch, n * b))


def _noise_width(config, vocab: int) -> int:
  """Draft uniforms per position (depth) a static tree consumes; 0 for deterministic trees."""
  if isinstance(config, DynamicTreeConfig) or config.sampling.greedy or config.children == "top":
    return 0
  tree = tree_shape.static_tree(config.branching)
  parents = (1,) + tree.level_sizes[:-1]
  per_depth = tree.level_sizes if config.children == "iid" else parents
  return max(per_depth) * vocab


def _draft_call(draft, draft_params, cache, last_two, context, tokens, depth, ancestors):
  """Feeds the last two committed tokens and tree nodes tokens [B, M] (depth [B, M] or [M],
  ancestors [B, M, M] or [M, M]) from slot context - 2; returns (logits [B, 2 + M, V], cache)."""
  batch, m = tokens.shape
  positions = jnp.concatenate([context[:, None] + jnp.arange(-2, 0),
                               context[:, None] - 1 + jnp.broadcast_to(depth, (batch, m))], axis=1)
  mask = jnp.broadcast_to(tree_shape.feed_mask(ancestors, 2), (batch, 2 + m, 2 + m))
  return draft.apply(draft_params, jnp.concatenate([last_two, tokens], axis=1),
                     positions.astype(jnp.int32), cache.replace(lengths=context - 2), mask)


def _grow_static(draft, draft_params, config: TreeConfig, cache, last_two, context, noise):
  """The static tree: one draft call per depth. noise [B, D + 1, W]. Returns (tokens [B, N],
  parent [N], depth [N], ancestors [N, N], valid [B, N], qs [B, N, V], draft cache)."""
  tree = tree_shape.static_tree(config.branching)
  batch = last_two.shape[0]
  tokens, qs, valid = [], [], []
  for d, b in enumerate(tree.branching, start=1):  # static: the tree's structure is fixed
    fed = sum(tree.level_sizes[:d - 1])
    nodes = jnp.concatenate(tokens, axis=1) if tokens else jnp.zeros((batch, 0), jnp.int32)
    logits, grown = _draft_call(draft, draft_params, cache, last_two, context, nodes,
                                tree.depth[:fed], tree.ancestors[:fed, :fed])
    at_parents = logits[:, 1:2] if d == 1 else logits[:, 2 + tree.level(d - 1).start:
                                                      2 + tree.level(d - 1).stop]
    level = _children(at_parents, b, noise[:, d - 1], config)
    for out, new in zip((tokens, qs, valid), level):
      out.append(new)
  return (jnp.concatenate(tokens, axis=1), tree.parent, tree.depth, tree.ancestors,
          jnp.concatenate(valid, axis=1), jnp.concatenate(qs, axis=1), grown)


def _grow_dynamic(draft, draft_params, config: DynamicTreeConfig, cache, last_two, context):
  """DySpec's greedy tree (`tree_growth`): one draft call per depth, each re-feeding the tree so
  far. Same returns as `_grow_static`, per row."""
  batch, size, depth_max = last_two.shape[0], config.node_budget, config.max_depth
  vocab = draft.vocab_size
  fan = tree_growth.fan(config.max_children, size, vocab)
  nodes = tree_growth.empty(batch, size)
  for d in range(1, depth_max + 1):  # static: D draft calls
    if d == 1:
      logits, grown = _draft_call(draft, draft_params, cache, last_two, context,
                                  jnp.zeros((batch, 0), jnp.int32), jnp.zeros((0,), jnp.int32),
                                  np.zeros((0, 0), bool))
      ranked = tree_growth.ranking(logits[:, 1], config.sampling)
    else:
      ancestors = tree_shape.ancestor_mask(nodes.parent, depth_max)
      logits, grown = _draft_call(draft, draft_params, cache, last_two, context, nodes.token,
                                  nodes.depth, ancestors)
      ranked = tree_growth.ranking(logits[:, 2:], config.sampling)
    nodes = tree_growth.grow(nodes, ranked, d, fan)
  qs = jax.nn.one_hot(nodes.token, vocab, dtype=jnp.float32)  # deterministic children: point masses
  return (nodes.token, nodes.parent, nodes.depth,
          tree_shape.ancestor_mask(nodes.parent, depth_max), nodes.valid, qs, grown)


@functools.partial(jax.jit, static_argnames=("target", "draft", "config"))
def sample(target: CausalModel, target_params, draft: CausalModel, draft_params,
           prompt: jax.Array, prompt_lengths: jax.Array, key: jax.Array,
           config: TreeConfig | DynamicTreeConfig) -> SampleOutput:
  """Generates up to N tokens per row after right-padded prompts with a draft token tree.

  Args as in `speculative.sample`; `config` is a `TreeConfig` (static) or `DynamicTreeConfig`.
  Randomness: the position decided at depth d draws that depth's children from the first W of
  its `draft_verify.position_uniforms` and is verified with the next N + V; the bonus position
  uses its last V.
  Returns:
    SampleOutput with the statistics of `draft_verify.decode` (gamma = D: `draft_calls` counts
    D per round, `acceptance` is accepted tokens per depth offered).
  Raises:
    ValueError: vocabularies differ, a distinct-children branching factor exceeds the
      vocabulary, or P + N - 1 + nodes exceeds either model's max_len.
  """
  batch, prompt_len = prompt.shape
  vocab, depth_max, size = target.vocab_size, config.num_draft_tokens, config.num_nodes
  cache_slots = _check(target, draft, prompt_len, config)
  width = _noise_width(config, vocab)
  greedy = config.sampling.greedy
  keys = rng.row_keys(key, batch)
  prompt_lengths = prompt_lengths.astype(jnp.int32)

  def round_fn(caches, seq, context):
    target_cache, draft_cache = caches
    decided = context[:, None] + jnp.arange(depth_max + 1)  # [B, D + 1] positions
    if greedy:  # one-hot p and qs: argmaxes, no randomness (`tree_walk.greedy_walk`)
      u = jnp.zeros((batch, depth_max + 1, 0), jnp.float32)
    else:
      u = draft_verify.position_uniforms(keys, decided, width + size + vocab)
    last_two = jnp.take_along_axis(seq, context[:, None] + jnp.arange(-2, 0), axis=1)
    if isinstance(config, TreeConfig):
      grown = _grow_static(draft, draft_params, config, draft_cache, last_two, context,
                           u[..., :width])
    else:
      grown = _grow_dynamic(draft, draft_params, config, draft_cache, last_two, context)
    tokens, parent, depth, ancestors, valid, qs, draft_cache = grown
    positions = jnp.concatenate([context[:, None] - 1,
                                 context[:, None] + jnp.broadcast_to(depth, (batch, size)) - 1], 1)
    mask = jnp.broadcast_to(tree_shape.feed_mask(ancestors, 1), (batch, 1 + size, 1 + size))
    logits, target_cache = target.apply(
        target_params, jnp.concatenate([last_two[:, 1:], tokens], axis=1), positions,
        target_cache.replace(lengths=context - 1), mask)
    count, path, emitted = tree_walk.verify(logits, tokens, parent, valid, depth_max,
                                            config.sampling, u[..., width:], qs)
    source = context[:, None] + path  # node j sits at slot context + j
    target_cache = slots.compact(target, target_cache, cache_slots, source, context)
    if depth_max > 1:  # the draft's last call held the nodes above depth D
      draft_cache = slots.compact(draft, draft_cache, cache_slots, source[:, :-1], context)
    return (target_cache, draft_cache), emitted, count

  return draft_verify.prefill_and_decode(round_fn, target, target_params, draft, draft_params,
                                         prompt, prompt_lengths, cache_slots, keys, config)


@dataclasses.dataclass(frozen=True)
class TreeOptions:
  """`sampler.*` settings of kind "tree" (second model: the draft).

  Attributes:
    branching: children per node at each depth of the static tree, e.g. (2, 2, 1).
    children: how children are drafted: "iid", "without_replacement" or "top" (the draft's most
      probable; greedy decoding always uses "top").
  """

  branching: tuple[int, ...] = (2, 2, 1)
  children: str = "iid"


@dataclasses.dataclass(frozen=True)
class DynamicTreeOptions:
  """`sampler.*` settings of kind "dynamic_tree" (DySpec; second model: the draft).

  Attributes:
    node_budget: nodes per tree.
    max_depth: the tree's depth limit.
  """

  node_budget: int = 8
  max_depth: int = 4


SPEC = SamplerSpec(
    "tree", TreeOptions, sample,
    lambda o, decode: TreeConfig(branching=tuple(o.branching), children=o.children,
                                 **decode.common()),
    second_model="draft", slack=lambda o: tree_shape.static_tree(tuple(o.branching)).num_nodes - 1)
DYNAMIC_SPEC = SamplerSpec(
    "dynamic_tree", DynamicTreeOptions, sample,
    lambda o, decode: DynamicTreeConfig(node_budget=o.node_budget, max_depth=o.max_depth,
                                        **decode.common()),
    second_model="draft", slack=lambda o: o.node_budget - 1)

"""Tabular "perfect" diffusion models over a short sequence, and the exact distributions of the
diffusion samplers built on them.

The parameters are an enumerated joint over V^T sequences (V real tokens 0..V-1, mask id V).
Every conditional the samplers ask for is computed from that joint by marginalisation, so the
denoiser, its block-causal variant and the any-subset AR model are exact, and what a sampler's
output should be is computable by brute force in numpy (`grouped_joint`, `ancestral_joint`).
"""

from __future__ import annotations

import dataclasses
import itertools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


def random_joint(seed: int, vocab: int, length: int, scale: float = 1.5) -> np.ndarray:
  """A strictly positive joint [V] * T float64: softmax of scaled normal logits."""
  logits = scale * np.random.default_rng(seed).normal(size=(vocab,) * length)
  joint = np.exp(logits - logits.max())
  return joint / joint.sum()


def all_sequences(vocab: int, length: int) -> np.ndarray:
  """[V^T, T] int32, every sequence in the joint's (row-major) order."""
  return np.array(list(itertools.product(range(vocab), repeat=length)), np.int32)


def tv(p, q) -> float:
  """Total-variation distance of two distributions of the same shape."""
  return 0.5 * float(np.abs(np.asarray(p, np.float64) - np.asarray(q, np.float64)).sum())


def empirical(tokens, vocab: int, length: int) -> np.ndarray:
  """Empirical joint [V] * T of samples [R, T]."""
  counts = np.bincount(np.ravel_multi_index(np.asarray(tokens).T, (vocab,) * length),
                       minlength=vocab ** length)
  return (counts / counts.sum()).reshape((vocab,) * length)


def _marginals(joint: jax.Array, seqs: jax.Array, tokens: jax.Array, sees: jax.Array,
               vocab: int) -> jax.Array:
  """[B, T, V + 1] logits: log p(x_i = v | x_j for the j that i sees), mask logit -inf.

  joint [S] float32, seqs [S, T], tokens [B, T], sees [B, T, T] bool (i sees j).
  """
  mismatch = (seqs[None, :, :] != tokens[:, None, :]).astype(jnp.float32)  # [B, S, T]
  conflicts = jnp.einsum("bij,bsj->bis", sees.astype(jnp.float32), mismatch)  # [B, T, S]
  weight = jnp.where(conflicts == 0, joint[None, None, :], 0.0)
  onehot = jax.nn.one_hot(seqs, vocab, dtype=jnp.float32)  # [S, T, V]
  mass = jnp.einsum("bis,siv->biv", weight, onehot)
  logits = jnp.log(mass)
  return jnp.concatenate([logits, jnp.full(logits.shape[:2] + (1,), -jnp.inf)], axis=-1)


@flax.struct.dataclass
class TokenCache:
  """tokens: [B, S] int32 per slot (slot = position); lengths: [B] int32."""

  tokens: jax.Array
  lengths: jax.Array


@dataclasses.dataclass(frozen=True)
class TabularJoint:
  """Sizes and parameters shared by the tabular models of a joint over `length` positions of
  `vocab` real tokens (the mask id is `vocab`); `params(joint)` flattens the joint table."""

  vocab: int
  length: int

  @property
  def vocab_size(self) -> int:
    return self.vocab + 1

  @property
  def max_len(self) -> int:
    return self.length

  @property
  def mask_id(self) -> int:
    return self.vocab

  def params(self, joint) -> dict:
    return {"joint": jnp.asarray(np.asarray(joint).ravel(), jnp.float32)}


@dataclasses.dataclass(frozen=True)
class TabularDenoiser(TabularJoint):
  """A perfect denoiser (and `CachedDenoiser`) of a joint over `length` positions.

  Attributes:
    vocab: V real tokens; the mask id is V and vocab_size is V + 1.
    length: T, the canvas length (= max_len).
    block_size: 0: a position sees every visible token; B > 0: only those in its own and earlier
      blocks of B positions (block-causal).
  Params: `params(joint)`.
  """

  block_size: int = 0

  def denoise(self, params, tokens: jax.Array) -> jax.Array:
    """tokens [B, T] -> [B, T, V + 1] logits (SUBS: visible positions one-hot on themselves)."""
    seqs = jnp.asarray(all_sequences(self.vocab, self.length))
    index = jnp.arange(self.length)
    visible = tokens != self.mask_id
    sees = visible[:, None, :] & (index[None, :, None] != index[None, None, :])
    if self.block_size:
      block = index // self.block_size
      sees &= (block[None, None, :] <= block[None, :, None])
    logits = _marginals(params["joint"], seqs, tokens, sees, self.vocab)
    own = jnp.where(jax.nn.one_hot(tokens, self.vocab + 1, dtype=bool), 0.0, -jnp.inf)
    return jnp.where(visible[..., None], own, logits)

  def init_cache(self, batch: int, max_len: int | None = None) -> TokenCache:
    return TokenCache(tokens=jnp.full((batch, max_len or self.length), self.mask_id, jnp.int32),
                      lengths=jnp.zeros((batch,), jnp.int32))

  def apply(self, params, tokens, positions, cache, attention_mask=None):
    """Scores new tokens [B, N] on top of the cached earlier slots: the canvas is the cache's
    valid slots, then the new tokens, then masks; logits at the new positions."""
    del attention_mask  # a diffusion block sees itself entirely
    batch, steps = tokens.shape
    slots = cache.lengths[:, None] + jnp.arange(steps)[None, :]
    rows = jnp.broadcast_to(jnp.arange(batch)[:, None], slots.shape)
    written = cache.tokens.at[rows, slots].set(tokens, mode="drop")
    valid = jnp.arange(self.length)[None, :] < (cache.lengths + steps)[:, None]
    logits = self.denoise(params, jnp.where(valid, written[:, :self.length], self.mask_id))
    new = jnp.take_along_axis(logits, positions[..., None], axis=1)
    return new, cache.replace(tokens=written, lengths=cache.lengths + steps)


@dataclasses.dataclass(frozen=True)
class TabularAnySubset(TabularJoint):
  """An exact any-subset AR model (`AnySubsetModel`) of a joint over `length` positions."""

  def conditionals(self, params, tokens: jax.Array, ranks: jax.Array) -> jax.Array:
    """[B, T, V + 1] logits of log p(x_i | visible, x_j with ranks[j] < ranks[i])."""
    seqs = jnp.asarray(all_sequences(self.vocab, self.length))
    before = (ranks[:, None, :] >= 0) & (ranks[:, None, :] < ranks[:, :, None])
    sees = (ranks[:, None, :] < 0) | before
    sees &= ~jnp.eye(self.length, dtype=bool)[None]
    return _marginals(params["joint"], seqs, tokens, sees, self.vocab)


# ----------------------------------------------------------------------------- exact outputs


def conditional(joint: np.ndarray, fixed: dict[int, int], position: int) -> np.ndarray:
  """p(x_position | x_j = v for (j, v) in fixed) [V] from joint [V] * T."""
  index = tuple(fixed.get(j, slice(None)) for j in range(joint.ndim))
  sub = joint[index]
  axes = [j for j in range(joint.ndim) if j not in fixed]
  mass = sub.sum(axis=tuple(a for a, j in enumerate(axes) if j != position))
  return mass / mass.sum()


def grouped_joint(joint: np.ndarray, groups: list[list[int]]) -> np.ndarray:
  """The output distribution [V] * T of committing `groups` of positions in order, each group's
  tokens drawn independently from their conditionals given the earlier groups."""
  vocab, length = joint.shape[0], joint.ndim
  out = np.zeros_like(joint)
  for seq in itertools.product(range(vocab), repeat=length):
    prob, fixed = 1.0, {}
    for group in groups:
      for i in group:
        prob *= conditional(joint, fixed, i)[seq[i]]
      fixed.update({i: seq[i] for i in group})
    out[seq] = prob
  return out


def ancestral_joint(joint: np.ndarray, unmask_probs: list[float]) -> np.ndarray:
  """The exact output distribution [V] * T of ancestral sampling from an all-mask canvas with a
  perfect denoiser: at step k each masked position is unmasked with probability unmask_probs[k]
  (the last must be 1), its token drawn from its conditional given the visible tokens."""
  vocab, length = joint.shape[0], joint.ndim
  states = {(): 1.0}  # tuple of (position, token) pairs visible -> probability
  for prob in unmask_probs:
    nxt: dict = {}
    for state, mass in states.items():
      fixed = dict(state)
      masked = [i for i in range(length) if i not in fixed]
      conds = {i: conditional(joint, fixed, i) for i in masked}
      for subset in itertools.chain.from_iterable(
          itertools.combinations(masked, r) for r in range(len(masked) + 1)):
        pick = prob ** len(subset) * (1 - prob) ** (len(masked) - len(subset))
        if pick == 0:
          continue
        for values in itertools.product(range(vocab), repeat=len(subset)):
          p = pick * np.prod([conds[i][v] for i, v in zip(subset, values)])
          key = tuple(sorted({**fixed, **dict(zip(subset, values))}.items()))
          nxt[key] = nxt.get(key, 0.0) + mass * p
    states = nxt
  out = np.zeros_like(joint)
  for state, mass in states.items():
    out[tuple(v for _, v in state)] += mass
  return out

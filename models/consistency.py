"""Consistency training for Jacobi decoding (CLLM: Kou et al. 2024, "CLLMs: Consistency Large
Language Models").

Jacobi decoding (`samplers.jacobi`) iterates a block of n - 1 guesses after the last committed
token until every guess is the model's greedy token given the guesses before it (the fixed point
y*, which is greedy AR's continuation), and commits per call as many tokens as the guesses its
outputs confirm, plus one. A model trained on text alone rarely predicts a right token after a
wrong guess, so it commits little more than one token per call. CLLM fine-tunes the model to map
any state of a Jacobi trajectory to the fixed point:

- the trajectory (`teacher_trajectory`): a frozen copy of the target (`train.teacher_workdir`)
  Jacobi-iterates the block that follows each window's prefix, from the sampler's first guesses
  (the last committed token repeated), to the fixed point: n calls of n tokens on the prefix
  cached once;
- the consistency term: cross-entropy of y* given a state drawn uniformly from the trajectory
  (CLLM's global consistency loss with hard labels; the frozen target's fixed point stands in for
  the paper's stop-gradient copy of the model, so the labels are the target's greedy tokens);
- the AR term: next-token cross-entropy on the window with y* as its block, which keeps the
  model's greedy continuation the target's (the paper's L_AR on the generated fixed points).

`loss` = consistency + ar_weight * AR. The trained model is an ordinary causal model: Jacobi
decoding of it is exactly its own greedy AR; how often that equals the target's greedy AR is
measured (the decode bench's `equal_to_target`), not guaranteed.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from models.losses import next_token_nll


def validate(train: Any, model: Any, seq_len: int) -> None:
  """ValueError unless the `train` section's consistency settings (`consistency_block`,
  `consistency_ar_weight`) suit it, the `model` (a ModelConfig: a plain causal one) and windows
  of `seq_len` tokens (a prefix before the block)."""
  block, heads = train.consistency_block, model.draft_heads
  if not block:
    if train.consistency_ar_weight != 1.0:
      raise ValueError("train.consistency_ar_weight is used only with train.consistency_block "
                       "> 0; leave it at 1.0 or set the block")
    return
  if block < 2:
    raise ValueError(f"train.consistency_block must be 0 (off) or a Jacobi block >= 2, got {block}")
  if (model.kind != "llama" or model.parscale.streams > 1 or heads.acceptance or heads.medusa
      or heads.eagle):
    raise ValueError(f"train.consistency_block trains a plain causal model for Jacobi decoding "
                     f"(model.kind='llama', one stream, no draft heads), got kind {model.kind!r}, "
                     f"{model.parscale.streams} streams, draft heads {heads}")
  if seq_len < block + 1:
    raise ValueError(f"train.consistency_block={block} needs data.seq_len >= {block + 1} (a "
                     f"prefix before the block), got {seq_len}")
  if train.steps and not train.teacher_workdir:
    raise ValueError("train.consistency_block learns the teacher's Jacobi fixed points: set "
                     "train.teacher_workdir=<the target's run> (and train.init_from=<the same "
                     "run>)")
  if train.consistency_ar_weight < 0:
    raise ValueError(f"train.consistency_ar_weight must be >= 0, got "
                     f"{train.consistency_ar_weight}")
  if train.distill_weight != 1.0:
    raise ValueError("train.distill_weight does not apply to consistency training "
                     "(train.consistency_block > 0); weigh its terms with "
                     "train.consistency_ar_weight")


def split(batch: jax.Array, block: int) -> tuple[jax.Array, int]:
  """(prefix [B, m], m) of a window batch [B, L + 1]: the window less its last `block` tokens,
  whose places the block's fixed point takes."""
  prefix_len = batch.shape[1] - block
  if prefix_len < 2:
    raise ValueError(f"a consistency window of {batch.shape[1]} tokens leaves no prefix before a "
                     f"block of {block}; set data.seq_len >= block + 1 (got {batch.shape[1] - 1})")
  return batch[:, :prefix_len], prefix_len


def teacher_trajectory(teacher: Any, params: Any, batch: jax.Array,
                       block: int) -> tuple[jax.Array, jax.Array]:
  """The frozen teacher's greedy Jacobi trajectory of the block after each window's prefix.

  Args:
    teacher: a causal model (`init_cache`, `prefill`, `apply`); params: its parameters.
    batch: [B, L + 1] int32 windows; the first m = L + 1 - block tokens are the prefix.
    block: n >= 2, the Jacobi block (the last prefix token and n - 1 guesses per call).
  Returns:
    states [n, B, n - 1] int32, the guesses before each call (state t has at least t leading
    guesses at the fixed point; state 0 is the last prefix token repeated, as the sampler
    guesses after its prefill and after a call that confirms the whole block), and fixed [B, n]
    int32, y*: the teacher's greedy continuation of the prefix.
  """
  rows = batch.shape[0]
  prefix, m = split(batch, block)
  head = prefix[:, :-1]
  _, cache = teacher.prefill(params, head, jnp.broadcast_to(jnp.arange(m - 1), head.shape),
                             teacher.init_cache(rows, batch.shape[1]))
  cache = cache.replace(lengths=jnp.full((rows,), m - 1, jnp.int32))
  positions = jnp.broadcast_to(m - 1 + jnp.arange(block), (rows, block))

  def call(guesses):  # [B, n - 1] -> the teacher's greedy outputs [B, n] for the block's places
    logits, _ = teacher.apply(params, jnp.concatenate([prefix[:, -1:], guesses], axis=1),
                              positions, cache)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)

  start = jnp.broadcast_to(prefix[:, -1:], (rows, block - 1))  # the sampler's first guesses

  def step(guesses, _):
    outputs = call(guesses)
    return outputs[:, :-1], (guesses, outputs)

  _, (states, outputs) = jax.lax.scan(step, start, None, length=block)
  return states, outputs[-1]


def leading_matches(outputs: jax.Array, target: jax.Array) -> jax.Array:
  """[B] int32: how many leading tokens of outputs [B, n] equal target [B, n]."""
  return jnp.sum(jnp.cumprod(outputs == target, axis=1), axis=1).astype(jnp.int32)


def loss(model: Any, params: Any, batch: jax.Array, trajectory: tuple[jax.Array, jax.Array],
         key: jax.Array, ar_weight: float = 1.0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """CLLM's objective on window batch [B, L + 1] and its teacher `trajectory`.

  Args:
    model: the causal model being trained (`logits(params, tokens [B, T]) -> [B, T, V]`).
    trajectory: (states [n, B, n - 1], fixed [B, n]) from `teacher_trajectory`.
    key: draws each row's state from the trajectory.
    ar_weight: weight of the AR term.
  Returns:
    (consistency + ar_weight * AR, metrics): `consistency_nll`, `ar_nll`, and `leading_correct`,
    the mean number of block tokens the model predicts right from the drawn state before its
    first miss.
  """
  states, fixed = trajectory
  count, rows, _ = states.shape
  block = fixed.shape[1]
  prefix, m = split(batch, block)
  drawn = jax.random.randint(key, (rows,), 0, count)
  state = states[drawn, jnp.arange(rows)]  # [B, n - 1]
  converged = jnp.concatenate([prefix, fixed], axis=1)  # [B, L + 1]
  inputs = jnp.concatenate([jnp.concatenate([prefix, state], axis=1), converged[:, :-1]], axis=0)
  logits = model.logits(params, inputs)  # [2B, L, V]
  from_state = logits[:rows, m - 1:]  # predicts y*_1..y*_n from the drawn state
  consistency = next_token_nll(from_state, fixed).mean()
  ar = next_token_nll(logits[rows:], converged[:, 1:]).mean()
  leading = leading_matches(jnp.argmax(from_state, axis=-1), fixed)
  return consistency + ar_weight * ar, {
      "consistency_nll": consistency, "ar_nll": ar,
      "leading_correct": jnp.mean(leading.astype(jnp.float32))}

"""The compiled loop shared by draft-then-verify samplers (speculative, SpecTr, tree, adaptive,
EAGLE, Medusa, prompt lookup, ...).

A sampler supplies one *round*: draft up to gamma tokens after each row's context, verify them in
one target pass, and return the tokens the row emits (accepted drafts, then one residual or bonus
token). This module owns the rest: checking the model pair, the per-position randomness, the
first token from the target's prefill, and a `lax.while_loop` that appends each row's tokens at
its own pointer, cuts rows at eos / max_new_tokens, and counts statistics.

Randomness: everything a round draws for a row's absolute position t (the draft token(s) at t,
then the uniforms that verify t or draw its bonus token) comes from one vector
`verify.uniforms(fold_in(row_key, t), (n,))` (`position_uniforms`). A position's uniforms are used
again in a later round only if everything drawn from them before was discarded, so every round
sees fresh randomness, and a row's samples do not depend on the rest of the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from samplers.core import emit, verify
from samplers.core.logits import SamplingParams, confidence, probs
from samplers.core.protocol import (CausalModel, SampleOutput, check_vocabularies,
                                    last_prompt_logits, prefill)

# (caches, seq [B, S] prompt + generated tokens, context_lengths [B]) ->
#   (caches, emitted [B, gamma + 1] int32, accepted [B] int32): row b emits
#   emitted[b, :accepted[b] + 1] (its accepted drafts, then one target token).
Round = Callable[[Any, jax.Array, jax.Array], tuple[Any, jax.Array, jax.Array]]
# A round whose rows draft different numbers of tokens (`decode(..., ragged_drafts=True)`):
# (caches, seq, context_lengths, active [B] bool: rows not yet finished) ->
#   (caches, emitted, accepted, drafted [B] int32 in [1, gamma]: drafts row b proposed,
#    draft_calls [] int32: draft calls the round made).
RaggedRound = Callable[[Any, jax.Array, jax.Array, jax.Array],
                       tuple[Any, jax.Array, jax.Array, jax.Array, jax.Array]]


def position_uniforms(keys: jax.Array, positions: jax.Array, size: int) -> jax.Array:
  """keys [B] typed, positions [B, W] int32 -> [B, W, size] uniforms for those positions."""
  def one(key, position):
    return verify.uniforms(jax.random.fold_in(key, position), (size,))

  batch, width = positions.shape
  flat = jax.vmap(one)(jnp.repeat(keys, width), positions.reshape(-1))  # one vmap compiles faster
  return flat.reshape(batch, width, size)


def round_noise(keys: jax.Array, context: jax.Array, gamma: int, vocab: int, greedy: bool):
  """A draft-then-verify round's randomness, fixed by the positions it decides (not the round).

  Args:
    keys: [B] typed per-row keys; context: [B] int32 tokens each row holds at the round's start.
    gamma: draft length; vocab: V; greedy: one-hot p and q need no randomness.
  Returns:
    (noise [B, gamma, V] for the drafts, or [B, gamma, 0] when greedy; verify_u
    [B, gamma + 1, 1 + V] for the acceptance tests and the residual/bonus draws, or None).
  """
  if greedy:
    return jnp.zeros((keys.shape[0], gamma, 0), jnp.float32), None
  window = context[:, None] + jnp.arange(gamma + 1)  # the positions p_1..p_{gamma+1} decide
  u = position_uniforms(keys, window, 1 + 2 * vocab)
  return u[:, :gamma, :vocab], u[..., vocab:]


def draw_draft(noise: jax.Array, logits: jax.Array,
               sampling: SamplingParams) -> tuple[jax.Array, jax.Array | None]:
  """A draft token per row and the distribution it was drawn from.

  Args:
    noise: [B, V] uniforms (unused when greedy, may then be [B, 0]).
    logits: [B, V] the draft's logits.
  Returns:
    (tokens [B] int32, q [B, V] float32); greedy: (the argmax, None), since greedy verification
    (`verify.greedy_chain`) needs no draft distribution.
  """
  if sampling.greedy:
    return jnp.argmax(logits.astype(jnp.float32), axis=-1).astype(jnp.int32), None
  q = probs(logits, sampling)
  return jax.vmap(verify.draw)(noise, q), q


def draft_after(draft: CausalModel, draft_params, seq: jax.Array, context: jax.Array, cache: Any,
                noise: jax.Array, gamma: int, sampling: SamplingParams,
                more: Callable[[jax.Array, jax.Array], jax.Array] | None = None
                ) -> dict[str, Any]:
  """A separate draft model's chain of gamma tokens after each row's `context` tokens.

  Cache invariant: the draft holds all of a row's tokens but the last two. It re-reads them (the
  second-to-last is missing after a round whose drafts were all accepted), draws draft 1, then
  feeds each draft to draw the next: gamma draft calls in all (with `more`, one per draft made).

  Args:
    seq: [B, S] int32 each row's tokens; context: [B] int32 how many it holds.
    noise: [B, gamma, V] the drafts' uniforms (`round_noise`; [B, gamma, 0] when greedy).
    more: None drafts gamma tokens; else `more(i, confidence) -> [] bool`, asked after i drafts
      (1 <= i; its answer counts while i < gamma) with their confidences (zeros after them),
      says whether to draft another for the whole batch (a `lax.while_loop`: the calls after a
      False are saved).
  Returns:
    {"drafts": [B, gamma] int32, "q": [B, gamma, V] their distributions (None when greedy),
    "confidence": [B, gamma] float32 each draft's top probability (`logits.confidence`),
    "cache": the draft's cache holding positions up to context + depth - 2, "depth": [] int32
    the drafts made (gamma without `more`; drafts, q and confidence are zeros after them)}.
  """
  last_two = context[:, None] + jnp.arange(-2, 0)  # [B, 2] positions
  logits, cache = draft.apply(draft_params, jnp.take_along_axis(seq, last_two, axis=1), last_two,
                              cache.replace(lengths=context - 2))
  first, q_first = draw_draft(noise[:, 0], logits[:, 1], sampling)

  def step(carry, inputs):  # feeds draft i (at position context + i - 1), draws draft i + 1
    token, cache = carry
    i, step_noise = inputs
    logits, cache = draft.apply(draft_params, token[:, None], (context + i - 1)[:, None], cache)
    token, q = draw_draft(step_noise, logits[:, 0], sampling)
    return (token, cache), (token, q, confidence(logits[:, 0]))

  if more is not None:
    return _draft_while(step, first, q_first, confidence(logits[:, 1]), cache, noise, gamma, more)
  (_, cache), (rest, q_rest, c_rest) = jax.lax.scan(
      step, (first, cache), (jnp.arange(1, gamma), jnp.moveaxis(noise[:, 1:], 1, 0)))
  q = None if sampling.greedy else jnp.concatenate([q_first[:, None], jnp.moveaxis(q_rest, 0, 1)],
                                                   axis=1)
  return {"drafts": jnp.concatenate([first[:, None], rest.T], axis=1), "q": q, "cache": cache,
          "confidence": jnp.concatenate([confidence(logits[:, 1])[:, None], c_rest.T], axis=1),
          "depth": jnp.int32(gamma)}


def _draft_while(step, first, q_first, first_confidence, cache, noise, gamma: int, more):
  """`draft_after`'s chain under `more`: `step` while `more(i, confidence)` says so."""
  put = lambda buffer, i, x: buffer.at[:, i].set(x)
  state = {"i": jnp.int32(1), "token": first, "cache": cache,
           "drafts": put(jnp.zeros(noise.shape[:2], jnp.int32), 0, first),
           "confidence": put(jnp.zeros(noise.shape[:2], jnp.float32), 0, first_confidence)}
  if q_first is not None:
    state["q"] = put(jnp.zeros(noise.shape[:2] + q_first.shape[-1:], jnp.float32), 0, q_first)

  def body(s):
    i = s["i"]
    (token, cache), (_, q, conf) = step((s["token"], s["cache"]), (i, noise[:, i]))
    out = {"i": i + 1, "token": token, "cache": cache, "drafts": put(s["drafts"], i, token),
           "confidence": put(s["confidence"], i, conf)}
    return out | ({"q": put(s["q"], i, q)} if "q" in s else {})

  s = jax.lax.while_loop(lambda s: (s["i"] < gamma) & more(s["i"], s["confidence"]), body, state)
  return {"drafts": s["drafts"], "q": s.get("q"), "cache": s["cache"],
          "confidence": s["confidence"], "depth": s["i"]}


def draft_chain(first_logits: jax.Array, carry: Any, feed: Callable, stops: Callable,
                noise: jax.Array, active: jax.Array, gamma: int,
                sampling: SamplingParams) -> tuple[dict[str, Any], Any]:
  """Drafts up to gamma tokens per row, each row stopping on its own (adaptive draft lengths).

  Draft 1 is drawn from `first_logits` [B, V]; while a row drafts, draft i + 1 is drawn from
  `feed(i, drafts[:, i - 1:i] [B, 1], carry) -> (logits [B, V], carry)`. After each draft,
  `stops(logits, carry) -> (stop [B] bool, carry)` (its distribution's logits) says whether the
  row stops there; the stopping draft is still proposed. The loop (`lax.while_loop`) ends when
  every `active` row has stopped or drafted gamma, which is where draft calls are saved.
  Whether position i is drafted depends on the drafter alone, never on the target, which keeps
  the verification exact.

  Args:
    noise: [B, gamma, V] the drafts' uniforms (`round_noise`; [B, gamma, 0] when greedy).
    active: [B] bool, the rows not yet finished (the others stop at once).
  Returns:
    ({"drafts": [B, gamma] int32, "lengths": [B] int32 in [1, gamma], "calls": [] int32 (1 +
    the feed calls), "q": [B, gamma, V] their distributions, absent when greedy}, carry).
  """
  batch, vocab = first_logits.shape
  first, q_first = draw_draft(noise[:, 0], first_logits, sampling)
  stop, carry = stops(first_logits, carry)
  state = dict(i=jnp.int32(1), carry=carry, drafting=active & ~stop,
               lengths=jnp.ones((batch,), jnp.int32),
               drafts=jnp.zeros((batch, gamma), jnp.int32).at[:, 0].set(first))
  if not sampling.greedy:
    state["q"] = jnp.zeros((batch, gamma, vocab), jnp.float32).at[:, 0].set(q_first)

  def body(s):
    i = s["i"]
    logits, carry = feed(i, jax.lax.dynamic_index_in_dim(s["drafts"], i - 1, axis=1), s["carry"])
    token, q = draw_draft(jax.lax.dynamic_index_in_dim(noise, i, axis=1, keepdims=False), logits,
                          sampling)
    stop, carry = stops(logits, carry)
    out = dict(i=i + 1, carry=carry, drafting=s["drafting"] & ~stop,
               lengths=s["lengths"] + s["drafting"].astype(jnp.int32),
               drafts=s["drafts"].at[:, i].set(token))
    if not sampling.greedy:
      out["q"] = s["q"].at[:, i].set(q)
    return out

  s = jax.lax.while_loop(lambda s: (s["i"] < gamma) & jnp.any(s["drafting"]), body, state)
  return {"drafts": s["drafts"], "lengths": s["lengths"], "calls": s["i"],
          **({"q": s["q"]} if "q" in s else {})}, s["carry"]


def verify_chain(drafts: jax.Array, q: jax.Array | None, logits: jax.Array,
                 verify_u: jax.Array | None, sampling: SamplingParams,
                 lengths: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Verifies each row's chain of drafts with one target pass (Leviathan et al. 2023).

  Draft i is accepted with probability min(1, p_i / q_i) until the first rejection, where a token
  is drawn from `verify.residual(p_i, q_i)`; after k acceptances of a row's k drafts a bonus
  token is drawn from p_{k+1}. A deterministic draft (n-gram lookup) passes one-hot q. Greedy
  uses the closed form `verify.greedy_chain` and needs neither q nor uniforms.

  Args:
    drafts: [B, gamma] int32; q: [B, gamma, V] the distributions they were drawn from (None
      when greedy); logits: [B, gamma + 1, V] the target's after the context's last token and
      after each draft; verify_u: [B, gamma + 1, 1 + V] uniforms (`round_noise`), None if greedy.
    lengths: [B] int32 in [0, gamma], the drafts each row proposed (adaptive draft lengths, batch
      draft selection; the positions after them are ignored, and a row with none emits one token
      drawn from p_1, an AR step); None: all gamma.
  Returns:
    (emitted [B, gamma + 1] int32, accepted [B] int32): row b emits emitted[b, :accepted[b] + 1].
  """
  if sampling.greedy:
    return verify.greedy_chain(drafts, logits, lengths)
  gamma = drafts.shape[1]
  if lengths is None:
    lengths = jnp.full(drafts.shape[:1], gamma, jnp.int32)
  p = probs(logits, sampling)  # [B, gamma + 1, V]
  accepted, tokens = jax.vmap(jax.vmap(verify.single_draft))(verify_u[:, :gamma], p[:, :gamma],
                                                             q, drafts)
  accepted &= jnp.arange(gamma)[None, :] < lengths[:, None]
  count = jnp.sum(jnp.cumprod(accepted, axis=1), axis=1, dtype=jnp.int32)  # [B] in [0, lengths]
  at = lambda x, i: jnp.take_along_axis(x, i.reshape(i.shape + (1,) * (x.ndim - 1)), axis=1)[:, 0]
  bonus = jax.vmap(verify.draw)(at(verify_u, lengths)[:, 1:], at(p, lengths))
  last = jnp.where(count < lengths, at(tokens, jnp.minimum(count, gamma - 1)), bonus)
  padded = jnp.concatenate([drafts, drafts[:, :1]], axis=1)
  emitted = jnp.where(jnp.arange(gamma + 1)[None, :] < count[:, None], padded, last[:, None])
  return emitted, count


def check_pair(target: CausalModel, draft: CausalModel, prompt_len: int, config) -> int:
  """Cache slots per row a decode needs; ValueError if the pair cannot run it (`chain_room`)."""
  check_vocabularies(target, draft, ("target", "draft"))
  return chain_room({"target": target, "draft": draft}, prompt_len, config)


def chain_room(models: dict[str, Any], prompt_len: int, config) -> int:
  """Cache slots per row of a chain of up to gamma drafts, P + N + gamma - 1: the verify window
  reaches gamma - 1 slots past prompt + max_new_tokens (drafts after the last needed token are
  scored and discarded). ValueError (`check_room`) when one of `models` has fewer."""
  gamma, steps = config.num_draft_tokens, config.max_new_tokens
  need = prompt_len + steps + gamma - 1
  check_room(models, need,
             f"prompt length {prompt_len} + max_new_tokens {steps} + num_draft_tokens {gamma} - 1",
             "max_new_tokens or num_draft_tokens")
  return need


def check_room(models: dict[str, Any], need: int, formula: str, lower: str) -> None:
  """ValueError when `need` slots (`formula` says how they add up) exceed the max_len of one of
  `models` (role -> model, e.g. {"target": ..., "draft": ...}); `lower` names the settings that
  would shrink it. With several models the message lists every max_len."""
  for name, model in models.items():
    if need > model.max_len:
      every = ", ".join(f"{role} max_len {m.max_len}" for role, m in models.items())
      raise ValueError(f"{formula} = {need} exceeds the {name}'s max_len {model.max_len}"
                       f"{f' ({every})' if len(models) > 1 else ''}; shorten the prompt or "
                       f"lower {lower}")


def newest(seq: jax.Array, context: jax.Array) -> jax.Array:
  """[B, 1] int32 each row's newest token of seq [B, S] (at context [B] - 1), the one the cache
  does not hold yet: the root the next call feeds."""
  return jnp.take_along_axis(seq, (context - 1)[:, None], axis=1)


def _write(seq: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
  """seq[b, start[b] + i] = new[b, i] (seq [B, S], new [B, W]); writes past S are dropped."""
  slots = start[:, None] + jnp.arange(new.shape[1])[None, :]
  rows = jnp.broadcast_to(jnp.arange(seq.shape[0])[:, None], slots.shape)
  return seq.at[rows, slots].set(new, mode="drop")


def commit(seq, prompt_lengths, n, done, new, count, max_new_tokens, eos_id):
  """Appends new[b, :count[b]] to each unfinished row, cut after eos and at max_new_tokens
  (an int, or [B] int32: each row's own limit).

  Tokens past a row's cut are written too but lie beyond its length, so nothing reads them.
  Returns (seq, n, done).
  """
  _, committed, done = emit.block(new, count, n, done, max_new_tokens, eos_id)
  return _write(seq, new, prompt_lengths + n), committed, done


def decode(round_fn: Round | RaggedRound, caches: Any, first_logits: jax.Array,
           prompt: jax.Array, prompt_lengths: jax.Array, keys: jax.Array, config, *,
           ragged_drafts: bool = False) -> SampleOutput:
  """Runs rounds until every row is done; returns the `SampleOutput` with statistics.

  Args:
    round_fn: the sampler's round (see `Round`; a `RaggedRound` with ragged_drafts).
    caches: the models' caches after prefilling the prompts (passed through to round_fn).
    first_logits: [B, V] the target's logits after each row's last prompt token; the first
      generated token is drawn from them (so the prefill is the first target call).
    prompt: [B, P] int32 right-padded prompts; prompt_lengths: [B] int32.
    keys: [B] per-row keys.
    config: a config with num_draft_tokens, max_new_tokens, sampling, eos_id, pad_id.
    ragged_drafts: round_fn is a `RaggedRound`: rows draft up to gamma tokens each, and the
      round reports how many it drafted and how many draft calls it made.
  Returns:
    SampleOutput; stats (int32 unless noted): `target_calls` (prefill included) = `model_calls`,
    `draft_calls` (prefill included; a round makes gamma), `generated_tokens`, `accepted_tokens`
    (drafts the verifier accepted), `drafted_tokens` (gamma per row per round it took part in),
    `rejections` (row-rounds that ended in a residual draw rather than a bonus token),
    `acceptance` (float32 accepted / drafted) and `tokens_per_target_call` (float32 generated
    tokens per row per target call that row took part in). With ragged_drafts, `draft_calls`
    and `drafted_tokens` count what the rounds reported, and two more: `mean_draft_length`
    (float32 drafted tokens per row-round) and `draft_calls_saved` (gamma per round minus the
    draft calls made: what drafting gamma tokens in every one of these rounds would have added).
  """
  batch, prompt_len = prompt.shape
  gamma, steps = config.num_draft_tokens, config.max_new_tokens
  vocab = first_logits.shape[-1]
  if config.sampling.greedy:
    first = draw_draft(None, first_logits, config.sampling)[0]
  else:
    noise = position_uniforms(keys, prompt_lengths[:, None], vocab)[:, 0]
    first = jax.vmap(verify.draw)(noise, probs(first_logits, config.sampling))
  seq = jnp.zeros((batch, prompt_len + steps + gamma), jnp.int32).at[:, :prompt_len].set(prompt)
  none = jnp.zeros((batch,), bool)
  seq, n, done = commit(seq, prompt_lengths, jnp.zeros((batch,), jnp.int32), none,
                        first[:, None], jnp.ones((batch,), jnp.int32), steps, config.eos_id)
  zero = jnp.int32(0)
  state = dict(seq=seq, n=n, done=done, caches=caches, rounds=zero, row_rounds=zero,
               accepted=zero, rejections=zero, drafted=zero, draft_calls=zero)

  def body(s):
    active = ~s["done"]
    # Finished rows still run (static shapes) from a context inside their data; they take nothing.
    context = prompt_lengths + jnp.minimum(s["n"], steps - 1)
    if ragged_drafts:
      caches, new, accepted, drafted, calls = round_fn(s["caches"], s["seq"], context, active)
    else:
      caches, new, accepted = round_fn(s["caches"], s["seq"], context)
      drafted, calls = jnp.full_like(accepted, gamma), jnp.int32(gamma)
    seq, n, done = commit(s["seq"], prompt_lengths, s["n"], s["done"], new, accepted + 1, steps,
                          config.eos_id)
    return dict(seq=seq, n=n, done=done, caches=caches, rounds=s["rounds"] + 1,
                row_rounds=s["row_rounds"] + jnp.sum(active, dtype=jnp.int32),
                accepted=s["accepted"] + jnp.sum(jnp.where(active, accepted, 0)),
                rejections=s["rejections"] + jnp.sum(active & (accepted < drafted),
                                                     dtype=jnp.int32),
                drafted=s["drafted"] + jnp.sum(jnp.where(active, drafted, 0)),
                draft_calls=s["draft_calls"] + calls)

  s = jax.lax.while_loop(lambda s: ~jnp.all(s["done"]), body, state)
  tokens = emit.generated(s["seq"], prompt_lengths, s["n"], steps, config.pad_id)
  generated_tokens = jnp.sum(s["n"])
  drafted = s["drafted"]
  stats = {
      "model_calls": 1 + s["rounds"],
      "target_calls": 1 + s["rounds"],
      "draft_calls": 1 + s["draft_calls"],
      "generated_tokens": generated_tokens,
      "accepted_tokens": s["accepted"],
      "drafted_tokens": drafted,
      "rejections": s["rejections"],
      "acceptance": s["accepted"] / jnp.maximum(drafted, 1).astype(jnp.float32),
      "tokens_per_target_call": generated_tokens / (batch + s["row_rounds"]).astype(jnp.float32),
  }
  if ragged_drafts:
    stats["mean_draft_length"] = drafted / jnp.maximum(s["row_rounds"], 1).astype(jnp.float32)
    stats["draft_calls_saved"] = gamma * s["rounds"] - s["draft_calls"]
  return SampleOutput(tokens=tokens, lengths=s["n"], stats=stats)


def prefill_and_decode(round_fn: Round | RaggedRound, target: CausalModel, target_params,
                       draft: CausalModel, draft_params, prompt: jax.Array,
                       prompt_lengths: jax.Array, slots: int, keys: jax.Array, config, *,
                       ragged_drafts: bool = False) -> SampleOutput:
  """Prefills both models' caches ([B, slots]) with the prompts, then runs `decode` from the
  target's logits after each row's last prompt token."""
  batch = prompt.shape[0]
  target_logits, target_cache = prefill(target, target_params, prompt,
                                        target.init_cache(batch, slots))
  _, draft_cache = prefill(draft, draft_params, prompt, draft.init_cache(batch, slots))
  first_logits = last_prompt_logits(target_logits, prompt_lengths)
  return decode(round_fn, (target_cache, draft_cache), first_logits, prompt, prompt_lengths, keys,
                config, ragged_drafts=ragged_drafts)

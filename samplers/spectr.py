"""Multi-draft speculative sampling: SpecTr k-sequential selection (Sun et al. 2023, "SpecTr: Fast
Speculative Decoding via Optimal Transport"), and drafts without replacement verified by
recursive rejection (SpecInfer, Miao et al. 2024).

Each round the draft proposes k sequences of gamma tokens after the row's context. The k drafts
are extra rows: one shared draft call on the context, then the k continuations batched as k rows
per row, and one target call scores all k windows. At each position the verifier runs over the
drafts that still agree with the emitted prefix: k-sequential selection with the division factor
rho (i.i.d. drafts), or recursive rejection with the renormalised draft distribution (drafts
sampled without replacement, which makes the first tokens distinct, so from the second position
on at most one draft is left). The round stops at the first residual draw; a bonus token follows
when some draft survives to its end.

Guarantee: every row's output has exactly the target's distribution (`samplers.ar`); the k-draft
acceptance lies between single-draft acceptance and `optimal.optimal_acceptance`. Caches are per
row (`samplers.core.rows`), so the copy of the accepted draft is kept and the others dropped; on
a mesh with logical axis rules (`parallelism.rules.activate`) the row caches, the k copies and the
output stay sharded over the batch's mesh axes ('data'), as in a batched sampler.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from samplers.core import draft_verify, rng, rows, verify
from samplers.core.logits import SamplingParams, probs
from samplers.core.protocol import (CausalModel, SampleOutput, check_max_new_tokens,
                                    check_num_draft_tokens, last_prompt_logits, prefill_method,
                                    prompt_positions)
from samplers.spec import SamplerSpec


@dataclasses.dataclass(frozen=True)
class SpecTrConfig:
  """Attributes:
    num_drafts: k >= 1 draft sequences per round.
    num_draft_tokens: gamma >= 1 tokens per draft sequence.
    max_new_tokens: N, tokens generated per row at most.
    sampling: how tokens are drawn; applied identically to target and draft.
    without_replacement: draw the k first tokens without replacement (recursive rejection);
      otherwise k i.i.d. sequences (k-sequential selection). Needs k <= vocab_size.
    eos_id: a row stops after emitting it; None never stops early.
    pad_id: fills `SampleOutput.tokens` after a row's end.
  """

  num_drafts: int
  num_draft_tokens: int
  max_new_tokens: int
  sampling: SamplingParams = SamplingParams()
  without_replacement: bool = False
  eos_id: int | None = None
  pad_id: int = 0

  def __post_init__(self):
    if self.num_drafts < 1:
      raise ValueError(f"num_drafts (k) must be >= 1, got {self.num_drafts}")
    check_num_draft_tokens(self.num_draft_tokens)
    check_max_new_tokens(self.max_new_tokens)


def _first_tokens(noise: jax.Array, q: jax.Array, without_replacement: bool):
  """The k drafts' first tokens [k] from q [V] with uniforms noise [k, V], and which are valid.

  I.i.d.: draft j uses noise[j], like later positions. Without replacement: Gumbel top-k over
  noise[0] (sequential sampling without replacement, Kool et al. 2019); draws past q's support
  are invalid.
  """
  copies = noise.shape[0]
  if not without_replacement:
    return jax.vmap(verify.draw, in_axes=(0, None))(noise, q), jnp.ones((copies,), bool)
  values, tokens = jax.lax.top_k(jnp.log(q) - jnp.log(-jnp.log(noise[0])), copies)
  return tokens.astype(jnp.int32), values > -jnp.inf


def _verify_row(u, p, q, drafts, valid, without_replacement: bool):
  """One row's round: runs the per-position rule over the drafts agreeing with the prefix.

  Args:
    u: [gamma + 1, k + V] uniforms of the positions p decides.
    p: [k, gamma + 1, V] target distributions per draft; q: [k, gamma, V] draft distributions.
    drafts: [k, gamma] int32; valid: [k] bool drafts taking part.
  Returns:
    (accepted count [] int32, the round's last token [] int32, index [] of a draft whose prefix
    was emitted, so its caches hold the emitted tokens).
  """
  gamma = drafts.shape[1]

  def position(carry, inputs):
    active, alive, count, last = carry
    u_i, i, p_i, q_i, tokens = inputs  # p_i, q_i [k, V]; tokens [k]
    ref = jnp.argmax(active)  # active drafts share the prefix, hence p_i and q_i
    if without_replacement:
      wor = verify.without_replacement(q_i[ref], tokens, active)
      qs = jnp.where(i == 0, wor, jnp.broadcast_to(q_i[ref], q_i.shape))
      index, token = verify.recursive_rejection(u_i, p_i[ref], qs, tokens, active)
    else:
      index, token = verify.k_sequential(u_i, p_i[ref], q_i[ref], tokens, active)
    accepted = alive & (index >= 0)
    last = jnp.where(alive & (index < 0), token, last)
    active = jnp.where(accepted, active & (tokens == token), active)
    return (active, accepted, count + accepted, last), None

  inputs = (u[:gamma], jnp.arange(gamma), jnp.moveaxis(p[:, :gamma], 1, 0),
            jnp.moveaxis(q, 1, 0), drafts.T)
  start = (valid, jnp.bool_(True), jnp.int32(0), jnp.int32(0))
  (active, alive, count, last), _ = jax.lax.scan(position, start, inputs)
  ref = jnp.argmax(active).astype(jnp.int32)
  last = jnp.where(alive, verify.draw(u[gamma, drafts.shape[0]:], p[ref, gamma]), last)
  return count, last, ref



@functools.partial(jax.jit, static_argnames=("target", "draft", "config"))
def sample(target: CausalModel, target_params, draft: CausalModel, draft_params,
           prompt: jax.Array, prompt_lengths: jax.Array, key: jax.Array,
           config: SpecTrConfig) -> SampleOutput:
  """Generates up to N tokens per row after right-padded prompts, with k drafts per round.

  Args as in `speculative.sample`. Position t of a row draws draft j's token there from
  uniforms [j V, (j + 1) V) of its `draft_verify.position_uniforms` (without replacement: the
  first tokens by Gumbel top-k over the first V), and is verified with the next k + V.
  `drafted_tokens` counts positions (gamma per row per round), whatever k.
  Raises:
    ValueError: vocabularies differ, P + N + gamma - 1 exceeds either model's max_len, or
      without_replacement with more drafts than tokens.
  """
  batch, prompt_len = prompt.shape
  copies, gamma, vocab = config.num_drafts, config.num_draft_tokens, target.vocab_size
  slots = draft_verify.check_pair(target, draft, prompt_len, config)
  if config.without_replacement and copies > target.vocab_size:
    raise ValueError(f"without_replacement needs num_drafts <= vocab_size; got num_drafts "
                     f"{copies} for vocab_size {target.vocab_size}")
  keys = rng.row_keys(key, batch)
  prompt_lengths = prompt_lengths.astype(jnp.int32)
  greedy = config.sampling.greedy

  def round_fn(caches, seq, context):
    """Same cache invariant as `speculative`; row b's copy j is row b * k + j."""
    target_rows, draft_rows = caches
    window = context[:, None] - 1 + jnp.arange(gamma + 1)  # [B, gamma + 1] positions
    width = 0 if greedy else vocab  # greedy: argmaxes, no uniforms
    if not greedy:
      u = draft_verify.position_uniforms(keys, window + 1, copies * vocab + copies + vocab)
      verify_u = u[..., copies * vocab:]  # [B, gamma + 1, k + V]
    noise = (jnp.zeros((batch, gamma, copies, 0), jnp.float32) if greedy
             else u[:, :gamma, :copies * vocab].reshape(batch, gamma, copies, vocab))
    last_two = context[:, None] + jnp.arange(-2, 0)  # [B, 2] positions
    logits, draft_rows = rows.call(draft.apply, draft_params,
                                   jnp.take_along_axis(seq, last_two, axis=1), last_two,
                                   rows.set_lengths(draft_rows, context - 2))
    if greedy:  # i.i.d. draws from a one-hot q all take its argmax (without replacement only
      # copy 0 does; the others fall outside q's support and are never verified)
      top = draft_verify.draw_draft(None, logits[:, 1], config.sampling)[0]
      first = jnp.broadcast_to(top[:, None], (batch, copies))
    else:
      q_first = probs(logits[:, 1], config.sampling)  # [B, V]
      first, valid = jax.vmap(_first_tokens, in_axes=(0, 0, None))(
          noise[:, 0], q_first, config.without_replacement)  # [B, k]
    copy_context = jnp.repeat(context, copies)  # [B * k]

    def draft_step(carry, inputs):  # feeds draft token i of every copy, draws token i + 1
      token, cache = carry
      i, step_noise = inputs  # step_noise [B * k, V]
      logits, cache = rows.call(draft.apply, draft_params, token[:, None],
                                (copy_context + i - 1)[:, None], cache)
      token, q = draft_verify.draw_draft(step_noise, logits[:, 0], config.sampling)
      return (token, cache), (token, q)

    step_noise = jnp.moveaxis(noise[:, 1:], 1, 0).reshape(gamma - 1, batch * copies, width)
    (_, draft_rows), (rest, q_rest) = jax.lax.scan(
        draft_step, (first.reshape(-1), rows.repeat(draft_rows, copies)),
        (jnp.arange(1, gamma), step_noise))
    rest = jnp.moveaxis(rest.reshape(gamma - 1, batch, copies), 0, 2)  # [B, k, gamma - 1]
    drafts = jnp.concatenate([first[..., None], rest], axis=2)  # [B, k, gamma]

    last_token = jnp.take_along_axis(seq, window[:, :1], axis=1)  # [B, 1]
    scored = jnp.concatenate([jnp.broadcast_to(last_token[:, None], (batch, copies, 1)), drafts],
                             axis=2).reshape(batch * copies, gamma + 1)
    logits, target_rows = rows.call(target.apply, target_params, scored,
                                    jnp.repeat(window, copies, axis=0),
                                    rows.repeat(rows.set_lengths(target_rows, context - 1), copies))
    if greedy:  # every valid copy is copy 0's argmax chain: `verify.greedy_chain` on it
      emitted, count = verify.greedy_chain(
          drafts[:, 0], logits.reshape(batch, copies, gamma + 1, vocab)[:, 0])
      first_copy = jnp.zeros((batch,), jnp.int32)
      kept = (rows.keep_copy(target_rows, first_copy), rows.keep_copy(draft_rows, first_copy))
      return kept, emitted, count
    q_rest = jnp.moveaxis(q_rest.reshape(gamma - 1, batch, copies, vocab), 0, 2)
    q_shared = jnp.broadcast_to(q_first[:, None, None], (batch, copies, 1, vocab))
    q = jnp.concatenate([q_shared, q_rest], axis=2)  # [B, k, gamma, V]
    p = probs(logits, config.sampling).reshape(batch, copies, gamma + 1, vocab)

    count, last, chosen = jax.vmap(_verify_row, in_axes=(0, 0, 0, 0, 0, None))(
        verify_u, p, q, drafts, valid, config.without_replacement)
    path = jnp.take_along_axis(drafts, chosen[:, None, None], axis=1)[:, 0]  # [B, gamma]
    index = jnp.arange(gamma + 1)[None, :]
    padded = jnp.concatenate([path, path[:, :1]], axis=1)
    emitted = jnp.where(index < count[:, None], padded, last[:, None])
    kept = (rows.keep_copy(target_rows, chosen), rows.keep_copy(draft_rows, chosen))
    return kept, emitted, count

  positions = prompt_positions(prompt)
  target_logits, target_rows = rows.call(prefill_method(target), target_params, prompt, positions,
                                         rows.init(target, batch, slots))
  _, draft_rows = rows.call(prefill_method(draft), draft_params, prompt, positions,
                            rows.init(draft, batch, slots))
  first_logits = last_prompt_logits(target_logits, prompt_lengths)
  return draft_verify.decode(round_fn, (target_rows, draft_rows), first_logits, prompt,
                             prompt_lengths, keys, config)


@dataclasses.dataclass(frozen=True)
class SpecTrOptions:
  """`sampler.*` settings of kind "spectr" (second model: the draft).

  Attributes:
    num_drafts: k, draft sequences per row.
    num_draft_tokens: gamma, tokens per draft sequence.
    without_replacement: drafts sampled without replacement (recursive rejection).
  """

  num_drafts: int = 2
  num_draft_tokens: int = 4
  without_replacement: bool = False


SPEC = SamplerSpec(
    "spectr", SpecTrOptions, sample,
    lambda o, decode: SpecTrConfig(num_drafts=o.num_drafts, num_draft_tokens=o.num_draft_tokens,
                                   without_replacement=o.without_replacement, **decode.common()),
    second_model="draft", slack=lambda o: o.num_draft_tokens)

"""Speculative sampling with an adaptive draft length per row.

Each round, every row drafts up to gamma tokens (Leviathan et al. 2023) and stops early by one of
two stopping rules that look only at the draft:

* "confidence": stop after the first drafted position where the draft model's confidence
  max_x softmax(draft logits)(x) is under `confidence_threshold` (the draft's raw distribution,
  whatever the sampling settings, so one threshold means the same greedy and at any temperature;
  a common dynamic draft-length heuristic).
* "head": SpecDec++ (Huang et al. 2024, "SpecDec++: Boosting Speculative Decoding via Adaptive
  Candidate Lengths"): an acceptance head on the draft predicts, at each drafted position i, the
  probability a_i that the token drafted there is accepted; the row stops after position k as soon
  as the predicted chance of a rejection among its drafts, 1 - prod_{i <= k} a_i, exceeds
  `stop_threshold`.

The token at the stopping position is still proposed: its distribution (and head prediction)
comes from the call that fed the previous draft, so proposing it costs no extra draft call, and a
row that drafts k tokens makes k draft calls. The draft loop is a `lax.while_loop` that ends when
every unfinished row has stopped (or drafted gamma), which is where draft calls are saved; the
target then verifies each row's own k drafts in one call (a batch pass over gamma + 1 positions,
the positions after a row's k-th draft ignored) with `verify.single_draft`, and draws the bonus
token from p_{k+1} when all k are accepted.

Guarantee: every row's output has exactly the distribution of sampling from the target alone
(`samplers.ar`), whatever the rule and thresholds: whether position i is drafted
depends only on the draft's distributions and head outputs at positions before i, never on the
target, so given the accepted prefix the next emitted token is ~ p either by speculative
verification of a draft from q or as the bonus token. Greedy output is the target's greedy
continuation token for token (up to numerical near-ties between batched and single-token calls).

A draft used with rule "head" implements, besides `CausalModel`:

  apply_with_acceptance(params, tokens [B, T], positions [B, T], cache)
      -> (logits [B, T, V] float32, acceptance_logit [B, T] float32, cache)

the result of `apply` plus, at each new token, the logit of the predicted probability that a token
drafted from that position's logits is accepted (`models.acceptance_head.AcceptanceDraftLM`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from samplers.core import draft_verify, rng
from samplers.core.logits import SamplingParams, confidence
from samplers.core.protocol import (CausalModel, SampleOutput, check_max_new_tokens,
                                    check_probabilities)
from samplers.spec import SamplerSpec

RULES = ("confidence", "head")


@dataclasses.dataclass(frozen=True)
class AdaptiveConfig:
  """Attributes:
    num_draft_tokens: gamma >= 1, the most tokens a row drafts per round.
    max_new_tokens: N, tokens generated per row at most.
    rule: the stopping rule, "confidence" or "head" (see the module docstring).
    confidence_threshold: rule "confidence" stops after a position whose draft confidence is
      under it; in [0, 1] (0 never stops early).
    stop_threshold: rule "head" stops once the predicted chance of a rejection exceeds it;
      in [0, 1] (1 never stops early).
    sampling: how tokens are drawn; applied identically to target and draft.
    eos_id: a row stops after emitting it; None never stops early.
    pad_id: fills `SampleOutput.tokens` after a row's end.
  """

  num_draft_tokens: int
  max_new_tokens: int
  rule: str = "confidence"
  confidence_threshold: float = 0.2
  stop_threshold: float = 0.8
  sampling: SamplingParams = SamplingParams()
  eos_id: int | None = None
  pad_id: int = 0

  def __post_init__(self):
    if self.num_draft_tokens < 1:
      raise ValueError(f"num_draft_tokens (the most drafted per round) must be >= 1, got "
                       f"{self.num_draft_tokens}")
    check_max_new_tokens(self.max_new_tokens)
    if self.rule not in RULES:
      raise ValueError(f"adaptive rule {self.rule!r} is unknown; valid rules: {', '.join(RULES)}")
    check_probabilities(self, "confidence_threshold", "stop_threshold")


def _draft_call(draft: CausalModel, params, rule: str):
  """(tokens, positions, cache) -> (logits [B, T, V], score [B, T] float32, cache): the draft's
  call and, per position, the quantity its rule stops on (confidence, or head probability)."""
  if rule == "head":
    def call(tokens, positions, cache):
      logits, acceptance, cache = draft.apply_with_acceptance(params, tokens, positions, cache)
      return logits, jax.nn.sigmoid(acceptance.astype(jnp.float32)), cache
  else:
    def call(tokens, positions, cache):
      logits, cache = draft.apply(params, tokens, positions, cache)
      return logits, confidence(logits), cache
  return call


def _stops(config: AdaptiveConfig, score: jax.Array,
           survival: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(stop after this position [B] bool, survival [B]) from this position's score [B].

  survival is the head's predicted chance that every draft so far is accepted (prod a_i);
  the confidence rule leaves it at 1.
  """
  if config.rule == "head":
    survival = survival * score
    return 1.0 - survival > config.stop_threshold, survival
  return score < config.confidence_threshold, survival


@functools.partial(jax.jit, static_argnames=("target", "draft", "config"))
def sample(target: CausalModel, target_params, draft: CausalModel, draft_params,
           prompt: jax.Array, prompt_lengths: jax.Array, key: jax.Array,
           config: AdaptiveConfig) -> SampleOutput:
  """Generates up to N tokens per row after right-padded prompts, with adaptive draft lengths.

  Args:
    target, draft: hashable `CausalModel`s with the same vocabulary (static); for rule "head"
      the draft also has `apply_with_acceptance` (module docstring).
    target_params, draft_params: their parameters.
    prompt: [B, P] int32, row b's prompt is prompt[b, :prompt_lengths[b]]; the rest is padding.
    prompt_lengths: [B] int32, each in [1, P].
    key: one key, or one per row (see `rng.row_keys`); position t of a row uses the uniforms of
      `draft_verify.position_uniforms` as in `samplers.speculative`.
    config: static `AdaptiveConfig`.
  Returns:
    SampleOutput with tokens [B, N] and the statistics of `draft_verify.decode` with ragged
    drafts: `draft_calls` (prefill included), `drafted_tokens`, `mean_draft_length`,
    `draft_calls_saved` (against drafting gamma in each of these rounds), `acceptance`,
    `tokens_per_target_call`, ...
  Raises:
    ValueError: vocabularies differ, P + N + gamma - 1 exceeds either model's max_len, or rule
      "head" with a draft that has no acceptance head.
  """
  batch, prompt_len = prompt.shape
  gamma, vocab = config.num_draft_tokens, target.vocab_size
  if config.rule == "head" and not hasattr(draft, "apply_with_acceptance"):
    raise ValueError("adaptive rule 'head' needs a draft with an acceptance head "
                     "(apply_with_acceptance; e.g. a model with model.draft_heads.acceptance=true trained "
                     "by the pair_draft_head experiment); this draft has none: train one or use "
                     "rule 'confidence'")
  slots = draft_verify.check_pair(target, draft, prompt_len, config)
  keys = rng.row_keys(key, batch)
  prompt_lengths = prompt_lengths.astype(jnp.int32)
  draft_call = _draft_call(draft, draft_params, config.rule)
  greedy = config.sampling.greedy

  def round_fn(caches, seq, context, active):
    """The cache invariant of `samplers.speculative`: the target holds all of the context but the
    last token, the draft all but the last two."""
    target_cache, draft_cache = caches
    window = context[:, None] - 1 + jnp.arange(gamma + 1)  # [B, gamma + 1] positions
    noise, verify_u = draft_verify.round_noise(keys, context, gamma, vocab, greedy)
    last_two = context[:, None] + jnp.arange(-2, 0)  # [B, 2] positions
    logits, score, draft_cache = draft_call(jnp.take_along_axis(seq, last_two, axis=1), last_two,
                                            draft_cache.replace(lengths=context - 2))

    def feed(i, fed, carry):  # feeds draft i (at position context + i - 1)
      logits, score, cache = draft_call(fed, (context + i - 1)[:, None], carry[0])
      return logits[:, 0], (cache, score[:, 0], carry[2])

    def stops(logits, carry):
      cache, score, survival = carry
      stop, survival = _stops(config, score, survival)
      return stop, (cache, score, survival)

    s, (draft_cache, _, _) = draft_verify.draft_chain(
        logits[:, 1], (draft_cache, score[:, 1], jnp.ones((batch,), jnp.float32)), feed, stops,
        noise, active, gamma, config.sampling)

    scored = jnp.concatenate([jnp.take_along_axis(seq, window[:, :1], axis=1), s["drafts"]], axis=1)
    logits, target_cache = target.apply(target_params, scored, window,
                                        target_cache.replace(lengths=context - 1))
    emitted, count = draft_verify.verify_chain(s["drafts"], s.get("q"), logits, verify_u,
                                               config.sampling, s["lengths"])
    return (target_cache, draft_cache), emitted, count, s["lengths"], s["calls"]

  return draft_verify.prefill_and_decode(round_fn, target, target_params, draft, draft_params,
                                         prompt, prompt_lengths, slots, keys, config,
                                         ragged_drafts=True)


@dataclasses.dataclass(frozen=True)
class AdaptiveOptions:
  """`sampler.*` settings of kind "adaptive" (second model: the draft).

  Attributes:
    num_draft_tokens: the most tokens the draft proposes per target call.
    rule: how a row's drafting stops, one of RULES: "confidence" (after a position where the
      draft's max probability is under confidence_threshold) or "head" (SpecDec++: once the
      draft's acceptance head predicts a rejection with probability over stop_threshold; needs
      a draft trained with model.draft_heads.acceptance=true, e.g. the pair_draft_head experiment).
    confidence_threshold, stop_threshold: in [0, 1].
  """

  num_draft_tokens: int = 4
  rule: str = "confidence"
  confidence_threshold: float = 0.2
  stop_threshold: float = 0.8


SPEC = SamplerSpec(
    "adaptive", AdaptiveOptions, sample,
    lambda o, decode: AdaptiveConfig(num_draft_tokens=o.num_draft_tokens, rule=o.rule,
                                     confidence_threshold=o.confidence_threshold,
                                     stop_threshold=o.stop_threshold, **decode.common()),
    second_model="draft", slack=lambda o: o.num_draft_tokens)

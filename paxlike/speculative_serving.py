"""Speculative decoding under load: the continuous-batch engines of `serving.serve_continuous`'s
speculative policies, each a choice of `samplers.continuous_spec` programs between checks.

* `FixedGamma` (`continuous_speculative`): every call, `rounds_per_sync` rounds of gamma drafts
  per slot.
* `SmartSpec` (`smartspec`; Liu et al. 2024, "Optimizing Speculative Decoding for Serving Large
  Language Models Using Goodput"): each call picks gamma in 0..G, the one with the most
  expected tokens per second. Before the clock starts it times each program with every slot
  full (gamma = 0 is `steps_per_sync` plain AR steps), which is the cost model at this batch
  size, and the draft's catch-up per token it lags (interleaved, `serving.time_programs`); each
  call's measured time then moves its program's cost by COST_RATE towards it (at most STALL
  times the cost), so a cost the warm-up set too cheap corrects itself while serving (one set
  too dear is not re-measured: the policy does not explore). It also keeps a running per-draft
  acceptance rate a (decayed counts of accepted drafts and of rejections, a = accepted /
  (accepted + rejections), the geometric maximum likelihood estimate). A round of gamma drafts
  then yields (1 - a^(gamma + 1)) / (1 - a) tokens per slot on average (Leviathan et al. 2023),
  and AR steps one per step; a round after AR steps also pays for the tokens the draft lags.
* `Tetris` (`tetris`; Wu et al. 2025): every call, `rounds_per_sync` rounds of
  `continuous_spec.select`: up to G drafts per slot (dense: the batch stops drafting where no
  deeper round could pay, `draft_selection.keep_drafting`), the `budget` most likely verified,
  at the width with the most expected tokens per second under costs measured before the clock;
  with `packed`, in one token-packed target call of the chosen drafts alone (one of G + 1
  sizes), so that each slot pays for its own drafts only.

`EagleFixedGamma` and `EagleSmartSpec` are `FixedGamma` and `SmartSpec` with the target's own
EAGLE head as the drafter (`samplers.continuous_eagle`): every program keeps the head current,
so no round pays a catch-up.

A policy's choices depend only on drafts and on past acceptance, never on the target's next
logits, so every request's tokens keep the target's distribution, and greedy ones equal AR.
"""

from __future__ import annotations

import time

import numpy as np

from paxlike.serving import ARSlots, Request, time_programs
from samplers import continuous, continuous_eagle, continuous_spec
from samplers.core.logits import SamplingParams

COST_RATE = 0.1  # SmartSpec's running cost: each call moves its program's cost this far to it
STALL = 3.0  # a call measured beyond this many times its cost (a stall, a GC pause) counts as this


class FixedGamma(ARSlots):
  """`rounds_per_sync` rounds of `gamma` drafts per slot between checks."""

  def __init__(self, target, target_params, draft, draft_params, num_slots: int,
               sampling: SamplingParams, gamma: int, rounds_per_sync: int = 1,
               steps_per_sync: int = 4):
    super().__init__(target, target_params, num_slots, sampling, steps_per_sync, gamma, draft,
                     draft_params)
    self.gamma, self.rounds = gamma, rounds_per_sync

  @staticmethod
  def _counters(slots: continuous.Slots) -> np.ndarray:
    """The slots' running (accepted drafts, rejections), read on the host."""
    return np.asarray([int(slots.accepted), int(slots.rejected)], float)

  def speculate(self, slots: continuous.Slots, gamma: int,
                rows: int | None = None) -> continuous.Slots:
    return continuous_spec.speculate(self.model, self.params, self.draft, self.draft_params,
                                     slots, self.config, gamma, self.rounds, rows)

  def advance(self, slots: continuous.Slots, rows: int | None = None) -> continuous.Slots:
    return self.speculate(slots, self.gamma, rows)


class SmartSpec(FixedGamma):
  """gamma in 0..`max_draft_tokens` per call by expected goodput (module docstring).

  Attributes after `warm_up`: costs {rows: [G + 1] seconds per call of each program on that many
  rows; `advance` moves a chosen program's cost towards its measured calls}; catch_up_costs
  {rows: seconds per token of the draft's lag, fed before a round}; `chosen`, the count of
  calls per gamma while serving.

  The lag term matters under load: AR steps leave the draft behind, and a lone round after many
  of them first feeds the draft tens of tokens per slot (wide calls, about 17 ms for 200 tokens
  on 8 slots of the bench's pair); priced as a plain round, such rounds cost SmartSpec 4-7% of
  continuous AR's throughput at 32 requests per second."""

  def __init__(self, target, target_params, draft, draft_params, num_slots: int,
               sampling: SamplingParams, max_draft_tokens: int, rounds_per_sync: int = 1,
               steps_per_sync: int = 4, decay: float = 0.9, prior: float = 0.5):
    super().__init__(target, target_params, draft, draft_params, num_slots, sampling,
                     max_draft_tokens, rounds_per_sync, steps_per_sync)
    self.decay, self.prior = decay, prior
    self.costs = {rows: np.ones(max_draft_tokens + 1) for rows in self.row_buckets()}
    self.catch_up_costs = {rows: 0.0 for rows in self.row_buckets()}
    self._reset()

  def _reset(self):
    self.counts = np.asarray([self.prior, 1.0 - self.prior])  # decayed (accepted, rejections)
    self.chosen = np.zeros(self.gamma + 1, int)

  def init(self, requests: list[Request]):
    self.seen = np.zeros(2)  # the new slots' counters (accepted, rejections)
    return super().init(requests)

  def program(self, gamma: int, rows: int):
    return (lambda s: self.ar_step(s, rows)) if gamma == 0 else (
        lambda s: self.speculate(s, gamma, rows))

  def warm_up(self, slots, requests: list[Request]):
    """Times each program with every slot full, interleaved (`serving.time_programs`); the
    acceptance of the timed rounds becomes the running estimate's starting counts (without them
    an estimate that starts low would keep choosing AR steps, which teach it nothing)."""
    counts = np.zeros(2)

    def counted(program):
      def run(s):
        nonlocal counts
        before = self._counters(s)
        s = program(s)
        counts += self._counters(s) - before
        return s
      return run

    behind = self.config.prompt_width // 2  # within every slot's prompt
    for rows in self.row_buckets():
      programs = [counted(self.program(gamma, rows)) for gamma in range(self.gamma + 1)]
      probes = self.catch_up_probes(rows, behind)
      costs, slots = time_programs([*programs, *probes], slots, lambda s: self.full(s, requests))
      self.costs[rows] = np.asarray(costs[:self.gamma + 1])
      if probes:
        self.catch_up_costs[rows] = max(costs[-2] - costs[-1], 0.0) / max(behind, 1)
    self._lag(slots)  # compiles the lag's read, which every call makes, before the clock
    self._reset()
    if counts.sum() > 0:
      self.counts = counts / counts.sum() * (1 / (1 - self.decay))  # a full window's weight
    return slots

  def catch_up_probes(self, rows: int, behind: int) -> list:
    """Two programs on `rows` slots whose cost difference over `behind` tokens is the draft's
    catch-up cost per token it lags: a catch-up from `behind` tokens back, and one from none."""
    catch_up = lambda lag: lambda s: continuous.on_rows(
        lambda t: continuous_spec.catch_up_from(self.draft, self.draft_params, t, lag,
                                                self.gamma + 2), s, rows)
    return [catch_up(behind), catch_up(0)]

  def expected_tokens(self) -> np.ndarray:
    """[G + 1] expected tokens per slot per call of each program, at the running acceptance."""
    a = min(self.counts[0] / self.counts.sum(), 1 - 1e-6)
    gammas = np.arange(self.gamma + 1)
    per_round = (1 - a ** (gammas + 1)) / (1 - a)
    return np.where(gammas == 0, self.steps_per_sync, self.rounds * per_round)

  @staticmethod
  def _lag(slots: continuous.Slots) -> int:
    """The most tokens an active slot's draft lacks, read on the host."""
    return int(continuous_spec.draft_lag(slots))

  def advance(self, slots, rows: int | None = None):
    rows = rows or self.num_slots
    lag = self._lag(slots) * self.catch_up_costs[rows]
    costs = self.costs[rows] + np.where(np.arange(self.gamma + 1) > 0, lag, 0.0)
    gamma = int(np.argmax(self.expected_tokens() / costs))
    self.chosen[gamma] += 1
    start = time.perf_counter()
    slots = self.program(gamma, rows)(slots)
    seen = self._counters(slots)  # waits for the call
    elapsed, cost = time.perf_counter() - start, self.costs[rows][gamma]
    spent = max(elapsed - (lag if gamma else 0.0), elapsed / 2)  # the catch-up is priced apart
    self.costs[rows][gamma] += COST_RATE * (min(spent, STALL * cost) - cost)
    self.counts = self.decay * self.counts + (seen - self.seen)
    self.seen = seen
    return slots


class EagleDrafter:
  """Mixin for `FixedGamma` and `SmartSpec`: the target's own EAGLE head drafts
  (`samplers.continuous_eagle`; the target must carry one, e.g. `pair_eagle`) instead of a draft
  model. Every program keeps the head current, so nothing lags: SmartSpec prices no catch-up.
  Admission is by prefill call (`ARSlots.prefill_call`); a call piggybacking prompt chunks would
  have to return their features too."""

  def __init__(self, target, target_params, num_slots: int, sampling: SamplingParams,
               max_draft_tokens: int, **options):
    super().__init__(target, target_params, None, None, num_slots, sampling, max_draft_tokens,
                     **options)
    if self.steps_per_sync > max_draft_tokens + 1:  # an AR call's features wait in G + 1 places
      raise ValueError(f"EAGLE-drafted engines take steps_per_sync <= max_draft_tokens + 1 = "
                       f"{max_draft_tokens + 1}, got {self.steps_per_sync}")

  @staticmethod
  def _lag(slots) -> int:
    return 0  # the head never lags (no device read, no program)

  def empty_slots(self) -> continuous.Slots:
    return continuous_eagle.init(self.model, self.params, self.config)

  def prefill_call(self, slots, pairs):
    slot, *inputs = self.admission(pairs)
    return continuous_eagle.admit(self.model, self.params, slots, slot, *inputs, self.config)

  def ar_step(self, slots, rows: int | None = None):
    return continuous_eagle.step(self.model, self.params, slots, self.config,
                                 self.steps_per_sync, rows)

  def speculate(self, slots, gamma: int, rows: int | None = None):
    return continuous_eagle.speculate(self.model, self.params, slots, self.config, gamma,
                                      self.rounds, rows)

  def catch_up_probes(self, rows: int, behind: int) -> list:
    return []


class EagleFixedGamma(EagleDrafter, FixedGamma):
  """`FixedGamma` with the target's EAGLE head as the drafter."""


class EagleSmartSpec(EagleDrafter, SmartSpec):
  """`SmartSpec` with the target's EAGLE head as the drafter."""


def affine_costs(costs) -> np.ndarray:
  """[K] float32: the least-squares line a + b k through `costs` [K] (seconds per call of the
  k-th verify width or size), with b >= 0 and every cost > 0. One cost (K = 1) is kept."""
  costs = np.asarray(costs, np.float64)
  if costs.size < 2:
    return costs.astype(np.float32)
  k = np.arange(costs.size)
  slope = max(float(np.polyfit(k, costs, 1)[0]), 0.0)
  fitted = np.mean(costs) - slope * np.mean(k) + slope * k
  return np.maximum(fitted, 1e-3 * np.mean(costs)).astype(np.float32)


def depth_costs(points: list[tuple[int, int]], costs, gamma: int) -> tuple[np.ndarray, np.float32]:
  """The least-squares plane c + d x depth + b x width through rounds timed at (depth, width)
  `points` (seconds `costs`), with d, b >= 0 and c > 0, so that a round of any depth >= 0 has a
  positive price: ([G + 1] float32 seconds per round verifying w = 0..G after G drafts,
  [] float32 d, seconds per draft call; 0 when the points hold one depth)."""
  design = np.asarray([[1.0, depth, width] for depth, width in points])
  c, d, b = np.linalg.lstsq(design, np.asarray(costs, np.float64), rcond=None)[0]
  d = max(d, 0.0) if len({depth for depth, _ in points}) > 1 else 0.0  # one depth: no d
  b = max(b, 0.0)
  floor = 1e-3 * float(np.mean(costs))
  c = max(float(np.mean(np.asarray(costs) - design[:, 1:] @ np.asarray([d, b]))), floor)
  return (c + d * gamma + b * np.arange(gamma + 1)).astype(np.float32), np.float32(d)


class Tetris(FixedGamma):
  """TETRIS rounds (`continuous_spec.propose`, then `verify_proposal` at the chosen width): up
  to `max_draft_tokens` drafts per slot, `budget` verified (default: all of them, S x G; the
  width is still chosen by expected goodput). Sampled requests keep the target's distribution
  with the default budget and a dense verify; a binding budget and `packed` choose which drafts
  to verify by ranking them against later drafts of the same slot, so they are for greedy
  decoding only (refused otherwise).

  The draft's top probabilities are calibrated against what the target accepts: under greedy
  verification a draft passes when the two argmaxes agree, which happens more often than the
  draft's top probability says (on the bench's pair, uncalibrated TETRIS chose width 1 in 365 of
  412 rounds and served 17% fewer tokens per second than fixed gamma). Each probability is scaled
  by the ratio of the running per-draft acceptance (decayed counts of accepted drafts and
  rejections, as in `SmartSpec`, started from the warm-up) to the running mean top probability
  of the verified drafts.

  With `packed` (a target with `apply_packed`), the drafts verified are the most likely ones
  across the batch, as many as a packed call of rows x (w + 1) tokens holds beside each slot's
  last token (w = 0..G, `draft_selection.packed_selection`), and the call holds those tokens
  alone: a confident slot's long chain and an unsure one's short chain cost what they hold.

  Costs are fitted to the warm-up's medians, not read off them: the medians' steps are uneven
  on a noisy machine (6.9, 7.8, 9.3, 11.4, 11.4 ms for widths 0-4 on 8 slots of the bench's
  pair), and the width a run favoured for its whole span followed that noise.
  Dense, the rounds are timed at every width after G drafts and at width 0 after 1..G - 1
  drafts, and priced by the plane c + d x depth + b x width (`depth_costs`; d, the seconds per
  draft call, drives the adaptive depth); packed, by the line through the sizes'
  (`affine_costs`).

  Attributes after `warm_up`: costs {rows: [G + 1] seconds per call on that many rows verifying
  w = 0..G drafts per slot after G drafted (packed: rows x (w + 1) tokens), fitted};
  `draft_steps` {rows: seconds per draft call}; `measured_costs`, the medians they were fitted
  to; `widths` and `depths`, the rounds per verify width (packed: per size) and per draft depth
  while serving."""

  def __init__(self, target, target_params, draft, draft_params, num_slots: int,
               sampling: SamplingParams, max_draft_tokens: int, budget: int | None = None,
               rounds_per_sync: int = 1, steps_per_sync: int = 4, decay: float = 0.9,
               packed: bool = False):
    if packed and not hasattr(target, "apply_packed"):
      raise ValueError("Tetris(packed=True) needs a target with apply_packed (token-packed "
                       "calls, e.g. a llama CausalLM); pass packed=False")
    if not sampling.greedy and (packed or (budget or num_slots * max_draft_tokens)
                                < num_slots * max_draft_tokens):
      raise ValueError("sampled TETRIS is exact only with a dense verify of every draft the "
                       "width admits: a packed size or a budget below slots x max_draft_tokens "
                       f"({num_slots * max_draft_tokens}) is chosen by looking at later drafts; "
                       "use greedy sampling, or packed=False and budget=None")
    super().__init__(target, target_params, draft, draft_params, num_slots, sampling,
                     max_draft_tokens, rounds_per_sync, steps_per_sync)
    self.packed = packed
    self.budget, self.decay = budget or num_slots * max_draft_tokens, decay
    self.costs = {rows: np.ones(max_draft_tokens + 1, np.float32) for rows in self.row_buckets()}
    self.measured_costs = dict(self.costs)
    self.draft_steps = {rows: np.float32(0.0) for rows in self.row_buckets()}
    self.widths, self.depths = np.zeros(max_draft_tokens + 1, int), np.zeros(max_draft_tokens + 1,
                                                                               int)
    # decayed (accepted drafts, rejections, top probabilities of verified drafts, their count)
    self.observed = np.zeros(4)

  def calibration(self) -> np.ndarray:
    """[] float32: running acceptance / running mean top probability (1 until both are seen)."""
    accepted, rejected, confidence, chosen = self.observed
    if accepted + rejected <= 0 or confidence <= 0:
      return np.asarray(1.0, np.float32)
    ratio = (accepted / (accepted + rejected)) / (confidence / chosen)
    return np.asarray(np.clip(ratio, 0.25, 4.0), np.float32)

  def select(self, slots, costs, rows: int, depth: int = 0):
    """`rounds_per_sync` rounds, each `continuous_spec.propose` then `verify_proposal` at the
    width it chose (two programs: no conditional over the target's cache); `depth` > 0 drafts
    exactly that many tokens (the warm-up's measurements; packed rounds always draft G)."""
    before = self._counters(slots)
    sizes = tuple(rows * (w + 1) for w in range(self.gamma + 1)) if self.packed else None
    adaptive = {} if self.packed else {"draft_step": self.draft_steps[rows],
                                       "depth": np.int32(depth)}
    for _ in range(self.rounds):
      slots, proposal = continuous_spec.propose(
          self.draft, self.draft_params, slots, self.config, min(self.budget, rows * self.gamma),
          costs, rows, self.calibration(), sizes, **adaptive)
      choice = int(proposal["width"])
      self.widths[choice] += 1
      self.depths[int(proposal["depth"])] += 1
      slots = continuous_spec.verify_proposal(
          self.model, self.params, slots, self.config, proposal,
          sizes[choice] if self.packed else choice, rows, self.packed)
      after = self._counters(slots)
      seen = [float(proposal["confidence_sum"]), float(proposal["chosen"])]
      self.observed = self.decay * self.observed + np.concatenate([after - before, seen])
      before = after
    return slots

  def warm_up(self, slots, requests: list[Request]):
    """Times rounds forced to each (depth, width): every width after G drafts and, dense, width 0
    after 1..G - 1 drafts; fits the costs (`affine_costs`, `depth_costs`)."""
    gamma = self.gamma
    forced = lambda width: np.where(np.arange(gamma + 1) == width, 1.0, 1e9).astype(np.float32)
    points = [(gamma, w) for w in range(gamma + 1)]
    points += [] if self.packed else [(d, 0) for d in range(1, gamma)]
    for rows in self.row_buckets():
      programs = [lambda s, d=d, w=w, r=rows: self.select(s, forced(w), r, d) for d, w in points]
      costs, slots = time_programs(programs, slots, lambda s: self.full(s, requests))
      self.measured_costs[rows] = np.asarray(costs, np.float32)
      if self.packed:
        self.costs[rows] = affine_costs(costs)  # float32, the warm-up's argument type: no retrace
      else:
        self.costs[rows], self.draft_steps[rows] = depth_costs(points, costs, gamma)
    self.widths[:] = self.depths[:] = 0
    return slots

  def advance(self, slots, rows: int | None = None):
    rows = rows or self.num_slots
    return self.select(slots, self.costs[rows], rows)

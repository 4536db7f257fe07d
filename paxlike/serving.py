"""Serving a stream of requests: static batching against continuous batching, in wall-clock time.

A request arrives at a time, with a prompt and a number of tokens to generate. Two loops:

* `serve_static`: when the server is idle it takes the requests that have arrived (up to
  `batch`) and decodes them as one batch with `samplers.ar` until the longest is done; nothing is
  admitted meanwhile, and a request's tokens are returned when its batch ends.
* `serve_continuous`: `samplers.continuous` slots; between calls of an engine's program the
  scheduler frees finished slots, admits every waiting request into the lowest free ones, and
  runs the program on the rows that cover the occupied slots. `ARSlots` (AR steps) is the
  engine here; `paxlike.prefill_serving` has its chunked-prefill and phase-split variants, and
  `paxlike.speculative_serving` the speculative ones.

Both take requests as they arrive in the trace (an open loop) or, with `clients=C`, in a closed
loop: at most C in flight, the next one sent whenever one is done (`paxlike.arrivals`). Both
compile everything before the clock starts and report per request its arrival, the time its
first token was ready, the time it was done and the gaps its tokens arrived with. A static
batch returns its tokens when it ends; its requests' first-token time and gaps are taken at the
batch's mean step time, so the latencies compare the two loops' decode steps.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from paxlike import timing
from paxlike.arrivals import Arrivals
from samplers import ar, continuous
from samplers.core.logits import SamplingParams

OUTPUT_BUCKET = 16  # static batches decode to their longest request, rounded up to this
PROMPT_BUCKET = 64  # the narrowest admission prefill (widths double from here)


@dataclasses.dataclass(frozen=True)
class Request:
  """prompt: [P] int32 token ids; max_new_tokens: tokens to generate; arrival_s: seconds after
  the trace starts; seed: the request's own key (`jax.random.key(seed)`)."""

  prompt: np.ndarray
  max_new_tokens: int
  arrival_s: float
  seed: int


@dataclasses.dataclass(frozen=True)
class Served:
  """A finished request: its tokens [max_new_tokens], its times in seconds after the start, and
  the gaps its tokens after the first arrived with (seconds per token between the checks that
  saw them: the inter-token latency a streaming client sees)."""

  tokens: np.ndarray
  arrival_s: float
  first_token_s: float
  done_s: float
  gaps: tuple[float, ...] = ()


def poisson_trace(prompts: list[np.ndarray], new_tokens: list[int], rate: float,
                  seed: int = 0) -> list[Request]:
  """Requests with exponential inter-arrival times of mean 1 / rate seconds, in order."""
  gaps = np.random.default_rng(seed).exponential(1.0 / rate, len(prompts))
  return [Request(np.asarray(p, np.int32), int(n), float(t), i)
          for i, (p, n, t) in enumerate(zip(prompts, new_tokens, np.cumsum(gaps)))]


def pad_to_width(prompts: list[np.ndarray], width: int) -> tuple[np.ndarray, np.ndarray]:
  """Token prompts right-padded to [N, width] int32, and their lengths [N] int32."""
  out = np.zeros((len(prompts), width), np.int32)
  for i, p in enumerate(prompts):
    out[i, :len(p)] = p
  return out, np.asarray([len(p) for p in prompts], np.int32)


def _bucket(n: int) -> int:
  return -(-n // OUTPUT_BUCKET) * OUTPUT_BUCKET


def reference(model, params, requests: list[Request], sampling: SamplingParams) -> list[np.ndarray]:
  """Each request decoded alone by `samplers.ar` with its own key (one compile for all)."""
  width, longest = max(len(r.prompt) for r in requests), max(r.max_new_tokens for r in requests)
  config = ar.ARConfig(max_new_tokens=longest, sampling=sampling)
  out = []
  for r in requests:
    prompt, length = pad_to_width([r.prompt], width)
    tokens = ar.sample(model, params, jnp.asarray(prompt), jnp.asarray(length),
                       jax.random.key(r.seed)[None], config).tokens
    out.append(np.asarray(tokens[0, :r.max_new_tokens]))
  return out


@functools.lru_cache(maxsize=64)
def _compiled_static(model, batch: int, width: int, new_tokens: int, sampling: SamplingParams,
                     tree, leaves: tuple[jax.ShapeDtypeStruct, ...]):
  params = jax.tree.unflatten(tree, leaves)
  return ar.sample.lower(model, params, jax.ShapeDtypeStruct((batch, width), jnp.int32),
                         jax.ShapeDtypeStruct((batch,), jnp.int32),
                         jax.random.split(jax.random.key(0), batch),
                         ar.ARConfig(max_new_tokens=new_tokens, sampling=sampling)).compile()


def clear_compiled() -> None:
  """Frees the static decoders compiled so far (`jax.clear_caches` frees the jitted ones)."""
  _compiled_static.cache_clear()


def _static_decoder(model, params, batch: int, width: int, new_tokens: int,
                    sampling: SamplingParams):
  """`samplers.ar` compiled for a static batch, once per shape in a process (a trace served at
  several rates reuses it)."""
  leaves, tree = jax.tree.flatten(params)
  abstract = tuple(jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
                   for leaf in leaves)
  return _compiled_static(model, batch, width, new_tokens, sampling, tree, abstract)


def serve_static(model, params, requests: list[Request], batch: int,
                 sampling: SamplingParams, timings: dict | None = None,
                 clients: int | None = None) -> list[Served]:
  """The static policy (module docstring); batches are padded to `batch` rows. `timings`, if
  given, receives "batch": [seconds of each batch's call]. `clients`: None serves the trace's
  arrival times; C serves it in a closed loop of at most C requests in flight
  (`paxlike.arrivals`)."""
  width = max(len(r.prompt) for r in requests)
  decoders = {n: _static_decoder(model, params, batch, width, n, sampling)
              for n in {_bucket(r.max_new_tokens) for r in requests}}
  waiting, served = Arrivals(requests, clients), {}
  start = time.perf_counter()
  clock = lambda: time.perf_counter() - start
  while waiting:
    if waiting.next_arrival() > clock():
      time.sleep(max(waiting.next_arrival() - clock(), 0))
    now, taken = clock(), []
    while len(taken) < batch and (r := waiting.take(now)) is not None:
      taken.append(r)
    rows = taken + [taken[0]] * (batch - len(taken))  # padding rows: discarded
    began, steps = clock(), _bucket(max(r.max_new_tokens for r in taken))
    prompt, prompt_lengths = pad_to_width([r.prompt for r in rows], width)
    keys = jnp.stack([jax.random.key(r.seed) for r in rows])
    out = decoders[steps](params, jnp.asarray(prompt), jnp.asarray(prompt_lengths), keys)
    tokens, done = np.asarray(out.tokens), clock()
    if timings is not None:
      timings.setdefault("batch", []).append(done - began)
    first = began + (done - began) / steps  # the batch's first step, at its mean step time
    for row, r in enumerate(taken):
      gaps = ((done - began) / steps,) * (r.max_new_tokens - 1)  # the same mean step time
      served[id(r)] = Served(tokens[row, :r.max_new_tokens], waiting.arrival_s(r), first, done,
                             gaps)
      waiting.finished(r, done)
  return [served[id(r)] for r in requests]


class ARSlots:
  """The continuous-batch engine of `continuous_ar`: between checks, `steps_per_sync` AR steps.

  An engine owns the slots' programs: `init(requests)` (empty slots sized for the trace),
  `admit(slots, slot, request)`, `advance(slots)` and `warm_up(slots, requests)` (compiles every
  program it may run, and measures what its policy needs, before the clock starts)."""

  def __init__(self, model, params, num_slots: int, sampling: SamplingParams,
               steps_per_sync: int = 4, max_draft_tokens: int = 0, draft=None,
               draft_params=None):
    self.model, self.params, self.num_slots, self.sampling = model, params, num_slots, sampling
    self.steps_per_sync, self.max_draft_tokens = steps_per_sync, max_draft_tokens
    self.draft, self.draft_params = draft, draft_params
    self.config = None

  deferred_admission = False  # True: admitted requests reach the slots in the next `advance`

  def init(self, requests: list[Request]) -> continuous.Slots:
    self.config = continuous.ContinuousConfig(
        num_slots=self.num_slots, max_new_tokens=max(r.max_new_tokens for r in requests),
        prompt_width=max(len(r.prompt) for r in requests), sampling=self.sampling,
        max_draft_tokens=self.max_draft_tokens)
    return self.empty_slots()

  def empty_slots(self) -> continuous.Slots:
    """S free slots under `self.config` (with the draft's cache when there is a draft)."""
    return continuous.init(self.model, self.config, self.draft)

  def admit(self, slots: continuous.Slots, slot: int, r: Request) -> continuous.Slots:
    return self.admit_all(slots, [(slot, r)])

  def admit_all(self, slots: continuous.Slots,
                pairs: list[tuple[int, Request]]) -> continuous.Slots:
    """Admits every (slot, request); here in one prefill call (`prefill_call`)."""
    return self.prefill_call(slots, pairs)

  def prefill_call(self, slots: continuous.Slots,
                   pairs: list[tuple[int, Request]]) -> continuous.Slots:
    """Prefills every (slot, request) in one call: its rows padded to a power of two and its
    width to the longest prompt's bucket (`buckets`), so few programs are compiled."""
    slot, *inputs = self.admission(pairs)
    return continuous.admit(self.model, self.params, slots, slot, *inputs, self.config,
                            self.draft, self.draft_params)

  def admission(self, pairs: list[tuple[int, Request]]) -> tuple[jax.Array, ...]:
    """(slot [K], prompt [K, W], prompt_length [K], keys [K], limit [K]) admitting `pairs`,
    padded to `buckets` (padding rows: slot S, which `continuous.admit` drops)."""
    rows, width = self.buckets(pairs)
    prompt, length = pad_to_width([r.prompt for _, r in pairs], width)
    pad = rows - len(pairs)
    slot = np.asarray([s for s, _ in pairs] + [self.num_slots] * pad, np.int32)
    prompt = np.concatenate([prompt, np.zeros((pad, width), np.int32)])
    length = np.concatenate([length, np.ones(pad, np.int32)])
    keys = jnp.stack([jax.random.key(r.seed) for _, r in pairs] + [jax.random.key(0)] * pad)
    limit = np.asarray([r.max_new_tokens for _, r in pairs] + [1] * pad, np.int32)
    return jnp.asarray(slot), jnp.asarray(prompt), jnp.asarray(length), keys, jnp.asarray(limit)

  def buckets(self, pairs: list[tuple[int, Request]]) -> tuple[int, int]:
    """(rows, width) of the prefill call that admits `pairs`: the smallest row bucket that holds
    them (`rows`) and the longest prompt rounded up to a power of two >= PROMPT_BUCKET (at most the
    trace's longest), so that a short prompt's prefill does not pay for the trace's longest."""
    rows = self.rows(len(pairs))
    longest = max(len(r.prompt) for _, r in pairs)
    width = PROMPT_BUCKET
    while width < longest:
      width *= 2
    return rows, min(width, self.config.prompt_width)

  def compile_admits(self, slots, requests: list[Request], admit=None):
    """Runs every admission program the trace may need (`admit(slots, pairs)`, default
    `admit_all`; compiles them before the clock), twice:
    slots a program has returned carry other shardings than fresh ones (with a draft, its
    cache's), so the first admission of each shape is compiled again for them. Without the
    second pass the speculative policies compiled each (rows, width) admission, 1.3 s apiece,
    while serving."""
    by_width = {self.buckets([(0, r)])[1]: r for r in requests}
    for _ in range(2):
      for r in by_width.values():
        for rows in self.row_buckets():
          slots = (admit or self.admit_all)(slots, [(slot, r) for slot in range(rows)])
    return slots

  def full(self, slots: continuous.Slots, requests: list[Request]) -> continuous.Slots:
    """Every slot prefilled with one of `requests` (warm-ups and cost measurements)."""
    return self.prefill_call(slots, [(slot, requests[slot % len(requests)])
                                  for slot in range(self.num_slots)])

  def row_buckets(self) -> list[int]:
    """The row counts programs are compiled for: powers of two below S, and S."""
    return sorted({min(1 << i, self.num_slots) for i in range(self.num_slots.bit_length() + 1)})

  def rows(self, occupied: int) -> int:
    """The rows a call computes when the first `occupied` slots hold every request
    (`continuous.on_rows`): the smallest bucket that covers them."""
    return min(r for r in self.row_buckets() if r >= occupied)

  def ar_step(self, slots: continuous.Slots, rows: int | None = None) -> continuous.Slots:
    return continuous.step(self.model, self.params, slots, self.config, self.steps_per_sync,
                           rows)

  def advance(self, slots: continuous.Slots, rows: int | None = None) -> continuous.Slots:
    """One call of the policy's program on the first `rows` slots (None: all)."""
    return self.ar_step(slots, rows)

  def warm_up(self, slots: continuous.Slots, requests: list[Request]) -> continuous.Slots:
    for rows in self.row_buckets():  # fresh and stepped slots alike
      for _ in range(2):
        slots = self.advance(self.admit(slots, 0, requests[0]), rows)
    return slots


def time_programs(programs: list, slots, reset=None, passes: int = 3,
                  repeats: int = 3) -> tuple[list[float], object]:
  """([median seconds per call of each of `programs` (slots -> slots)], the slots), timed in
  `passes` interleaved passes: in each, every program runs from `reset(slots)` once untimed,
  then `repeats` timed calls (`paxlike.timing.interleaved_times`, with the slots threaded from
  call to call). Interleaving spreads the machine's drift over all programs alike: timed one
  after another (5 calls each), a 2-core VM's noise moved SmartSpec's cost of a 1-draft round by
  40% between warm-ups, enough to pick it over AR steps for a whole run."""
  times, state = [[] for _ in programs], [slots]
  for _ in range(passes):
    for timed, program in zip(times, programs):
      state[0] = reset(state[0]) if reset else state[0]
      run = lambda p=program: state.__setitem__(0, jax.block_until_ready(p(state[0])))
      run()  # untimed: the first call after a reset
      (calls,), _ = timing.interleaved_times([run], repeats)
      timed += calls
  return [float(np.median(t)) for t in times], state[0]


def serve_continuous(model, params, requests: list[Request], num_slots: int,
                     sampling: SamplingParams, steps_per_sync: int = 4,
                     engine: ARSlots | None = None, timings: dict | None = None,
                     clients: int | None = None) -> list[Served]:
  """The continuous policy (module docstring) with `num_slots` slots: AR steps, or the
  programs of `engine` (e.g. `paxlike.speculative_serving`'s); `clients` as in `serve_static`.
  `timings`, if given, receives the seconds of each "admit" (from the call until the slots'
  token counts are read; for an engine that defers admission, the dispatch alone) and each
  "advance" (until its results are read), the scheduler's view of where the time goes."""
  engine = engine or ARSlots(model, params, num_slots, sampling, steps_per_sync)
  generated = jax.jit(continuous.generated, static_argnames="config")
  slots = engine.warm_up(engine.compile_admits(engine.init(requests), requests), requests)
  jax.block_until_ready(generated(slots, config=engine.config))
  slots = engine.init(requests)
  waiting, owner, served = Arrivals(requests, clients), {}, {}
  seen = _Seen(owner)
  start = time.perf_counter()
  clock = lambda: time.perf_counter() - start
  timings = {} if timings is None else timings
  timed = lambda kind, since: timings.setdefault(kind, []).append(clock() - since)
  while waiting or owner:
    if not owner and waiting.next_arrival() > clock():
      time.sleep(max(waiting.next_arrival() - clock(), 0))
    now, pairs = clock(), []
    for slot in range(num_slots):
      if slot not in owner and (r := waiting.take(now)) is not None:
        owner[slot] = r
        pairs.append((slot, r))
    began = clock()
    if pairs:
      slots = engine.admit_all(slots, pairs)
    if not engine.deferred_admission:
      seen.note(slots, clock)
    if pairs:
      timed("admit", began)
    began = clock()
    slots = engine.advance(slots, engine.rows(max(owner) + 1))  # admitted: lowest free slots
    active, n = np.asarray(slots.active), seen.note(slots, clock)
    timed("advance", began)
    done = clock()
    finished = [s for s in owner if not active[s] and n[s] >= 1]  # n = 0: still prefilling
    tokens = np.asarray(generated(slots, config=engine.config)) if finished else None
    for slot in finished:
      r = owner.pop(slot)
      served[id(r)] = Served(tokens[slot, :r.max_new_tokens], waiting.arrival_s(r),
                             seen.first[id(r)], done, tuple(seen.gaps[id(r)]))
      waiting.finished(r, done)
  return [served[id(r)] for r in requests]


class _Seen:
  """What the scheduler has seen of each owned request: its first token's time, then the gaps
  its later tokens arrived with."""

  def __init__(self, owner: dict):
    self.owner, self.first, self.gaps, self.last = owner, {}, collections.defaultdict(list), {}

  def note(self, slots, clock) -> np.ndarray:
    """Reads the slots' token counts n [S] (returned) and notes what is new."""
    n = np.asarray(slots.n)
    now = clock()
    for slot, r in self.owner.items():
      if n[slot] < 1:
        continue
      if id(r) not in self.first:
        self.first[id(r)], self.last[id(r)] = now, (n[slot], now)
        continue
      count, then = self.last[id(r)]
      if n[slot] > count:
        self.gaps[id(r)] += [(now - then) / (n[slot] - count)] * int(n[slot] - count)
        self.last[id(r)] = (n[slot], now)
    return n


def summary(served: list[Served], timings: dict | None = None) -> dict[str, float]:
  """Throughput (generated tokens/s from the first arrival to the last completion), and p50 and
  p99 in seconds of: time to first token, time per output token (a request's mean after its
  first) and inter-token latency (every token's gap, pooled over requests). With the serving
  loop's `timings`, also `calls_K` and `seconds_K` (count and total) per kind of call K and
  `busy_share`, the share of the span spent in calls."""
  tokens = sum(len(s.tokens) for s in served)
  span = max(s.done_s for s in served) - min(s.arrival_s for s in served)
  ttft = [s.first_token_s - s.arrival_s for s in served]
  tpot = [(s.done_s - s.first_token_s) / max(len(s.tokens) - 1, 1) for s in served]
  gaps = [gap for s in served for gap in s.gaps] or [0.0]
  pct = lambda xs, q: round(float(np.percentile(xs, q)), 4)
  calls = {}
  for kind, seconds in sorted((timings or {}).items()):
    calls.update({f"calls_{kind}": len(seconds), f"seconds_{kind}": round(sum(seconds), 3)})
  if timings:
    calls["busy_share"] = round(sum(map(sum, timings.values())) / span, 3)
  return {"throughput": round(tokens / span, 1), "ttft_p50": pct(ttft, 50),
          "ttft_p99": pct(ttft, 99), "tpot_p50": pct(tpot, 50), "tpot_p99": pct(tpot, 99),
          "itl_p50": pct(gaps, 50), "itl_p99": pct(gaps, 99), **calls}

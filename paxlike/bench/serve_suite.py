"""The `serve` suite: a Poisson request trace served by static and continuous batching.

The target is the decode suite's `pair_target` (trained or loaded from `--workdir`). Requests are
held-out tinyshakespeare snippets of 16-64 bytes (uniform), arriving as a Poisson process at each
rate (requests per second). Each asks for a number of new tokens drawn from one of two
distributions of the same mean, 56 (`outputs`):

* `uniform`: 16-96, uniform;
* `long_tail`: 16 plus an exponential of mean 40, cut at 256. Real request traces have such a
  tail (a few answers many times the mean), and it is where batching policies part: a static
  batch runs until its longest request ends.

Each policy serves the same traces (`paxlike.serving`), greedy; a row reports throughput
(generated tokens per second from the first arrival to the last completion), time to first
token, time per output token (a request's mean) and inter-token latency (each token's gap as the
scheduler saw it), p50 and p99, and whether every request's tokens equal its batch-1 AR decode.
Rows name their traces in `prompts` and `outputs`. Each carries the trace's ceiling, measured
beside its rate's runs, `full_slots_throughput`: tokens per second of `continuous_ar`'s call on
`batch` full slots with nothing to admit (`full_slots_rate`), and its `share_of_full_slots`
(what prefill, idle and finished slots and the scheduler cost a policy; a speculative one may
pass 1). Rows also say where the time went as the scheduler saw it (`serving.summary`'s
`calls_K` / `seconds_K` per kind of call, admissions and advances, or static batches, and
`busy_share`, the share of the span spent in calls rather than waiting for requests or in
the scheduler's host work).

Policies: `static` (batches of up to `batch` arrived requests, each decoded to its longest),
`continuous_ar` (`batch` slots, refilled between calls of 4 AR steps), and speculative ones:
`continuous_speculative` (rounds of gamma drafts per slot) and `smartspec` (0..gamma per call by
expected goodput), each once per drafter in `drafters` (`model`: the decode suite's `pair_draft`,
gamma NUM_DRAFT_TOKENS; `eagle`: the target's own EAGLE head, `pair_eagle`, gamma
EAGLE_DRAFT_TOKENS; both trained or loaded likewise), and `tetris` (batch draft selection,
NUM_DRAFT_TOKENS drafted per slot by `pair_draft`); see `paxlike.speculative_serving`. Rows name
their `drafter` (`none` for static and continuous AR). Policies are interleaved: on each trace,
each rate runs every policy before the next rate (a trace's compiled programs are freed before
the next trace's).

Another trace, `with_long` (uniform outputs), makes a quarter of the prompts long
(LONG_PROMPT_BYTES) and serves it with `continuous_ar` admitting by a prefill call and with
prompts piggybacked on the decode steps (`chunked_prefill`: at most C tokens of a prompt per
call, `prefill_serving.PiggybackedARSlots`). `--prefills` says how `continuous_ar` and
`smartspec` admit on the short traces (PREFILLS; default piggybacked). With two
devices or more, `continuous_ar` also runs with prefill on the first and decode on the second
(`phase_split`, `prefill_serving.SplitARSlots`). A CPU host has one device: simulating two
(`--xla_force_host_platform_device_count=2`) gives each half the cores and halves every row's
speed, so there the split is only tested, not measured.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import jax
import numpy as np

from paxlike import prefill_serving, registry, serving, speculative_serving, tokenizer
from paxlike.bench import harness
from paxlike.bench.decode_suite import drafting_on_target, shortened, trained
from paxlike.data import load_corpus
from paxlike.errors import UserError
from samplers.core.logits import SamplingParams

POLICIES = ("static", "continuous_ar", "continuous_speculative", "smartspec", "tetris")
NUM_DRAFT_TOKENS = 4
PROMPT_BYTES = (16, 64)
LONG_PROMPT_BYTES = (256, 384)
LONG_SHARE = 0.25  # of the `with_long` trace's prompts
NEW_TOKENS = (16, 96)  # the `uniform` outputs' range
OUTPUTS = ("uniform", "long_tail")
TAIL_NEW_TOKENS = (16, 40.0, 256)  # `long_tail`: least, the exponential's mean above it, most
CHUNK = 64  # piggybacked prefill: the most prompt tokens a decode call carries
PREFILLS = ("call", "piggybacked")  # how continuous_ar and smartspec admit prompts
PIGGYBACKED = ("continuous_ar", "smartspec")  # the policies that run with each of `prefills`
SPECULATIVE = ("continuous_speculative", "smartspec", "tetris")
DRAFTED = SPECULATIVE[:2]  # the policies that run once per drafter (TETRIS: the model only)
DRAFTERS = ("model", "eagle")  # pair_draft, or the target's own EAGLE head (pair_eagle)
EAGLE_DRAFT_TOKENS = 6  # G of the EAGLE head's policies: its drafts are mostly accepted


def trace_inputs(count: int, seed: int = 0, long_share: float = 0.0,
                 outputs: str = "uniform") -> tuple[list[np.ndarray], list[int]]:
  """`count` prompts (eos first, then 16-64 held-out bytes, or LONG_PROMPT_BYTES for a
  `long_share` of them) and new-token counts (`outputs`: NEW_TOKENS uniform, or TAIL_NEW_TOKENS'
  cut exponential)."""
  if outputs not in OUTPUTS:
    raise ValueError(f"outputs={outputs!r}; valid: {', '.join(OUTPUTS)}")
  rng = np.random.default_rng(seed)
  registry.load_modules()
  held_out = load_corpus(registry.get("pair_target").data).held_out
  prompts = []
  for _ in range(count):
    low, high = LONG_PROMPT_BYTES if rng.random() < long_share else PROMPT_BYTES
    size = int(rng.integers(low, high + 1))
    start = int(rng.integers(0, len(held_out) - size))
    prompts.append(np.concatenate([[tokenizer.EOS_ID], held_out[start:start + size]]))
  if outputs == "long_tail":
    least, mean, most = TAIL_NEW_TOKENS
    tail = least + np.floor(rng.exponential(mean, count)).astype(int)
    return prompts, np.minimum(tail, most).tolist()
  return prompts, rng.integers(NEW_TOKENS[0], NEW_TOKENS[1] + 1, count).tolist()


def _choices(engine) -> dict[str, Any]:
  """What a speculative policy chose: SmartSpec's calls per gamma, TETRIS's rounds per verify
  width and per draft depth, and both adaptive policies' cost per call (seconds, by rows
  computed) of each gamma / verify width (TETRIS: fitted, with its seconds per draft call)."""
  costs = lambda: {str(rows): [round(float(c), 5) for c in per] for rows, per in
                   engine.costs.items()}
  piggybacked = ({"calls_piggybacked": engine.calls_piggybacked}
                 if isinstance(engine, prefill_serving.Piggybacked) else {})
  if isinstance(engine, speculative_serving.SmartSpec):
    return {"calls_per_gamma": engine.chosen.tolist(), "cost_per_gamma_s": costs(), **piggybacked}
  if isinstance(engine, speculative_serving.Tetris):
    return {"rounds_per_width": engine.widths.tolist(), "cost_per_width_s": costs(),
            "rounds_per_depth": engine.depths.tolist(),
            "draft_step_s": {str(rows): round(float(s), 6) for rows, s in
                             engine.draft_steps.items()}}
  return piggybacked


def _engines(model, params, draft, headed, batch: int, steps_per_sync: int,
             sampling: SamplingParams):
  """policy -> a function making its fresh engine (None: static batching); `headed`: (the
  target with its EAGLE head, its params), or (None, None)."""
  pair = (model, params, *draft, batch, sampling)
  gamma = NUM_DRAFT_TOKENS
  eagle = (*headed, batch, sampling, EAGLE_DRAFT_TOKENS)
  return {"static": None,
          "continuous_speculative, eagle": lambda: speculative_serving.EagleFixedGamma(*eagle),
          "smartspec, eagle": lambda: speculative_serving.EagleSmartSpec(*eagle),
          "continuous_ar": lambda: serving.ARSlots(model, params, batch, sampling, steps_per_sync),
          "continuous_speculative": lambda: speculative_serving.FixedGamma(*pair, gamma),
          "smartspec": lambda: speculative_serving.SmartSpec(*pair, gamma),
          "tetris": lambda: speculative_serving.Tetris(*pair, gamma),
          "continuous_ar, piggybacked": lambda: prefill_serving.PiggybackedARSlots(
              model, params, batch, sampling, steps_per_sync, CHUNK),
          "smartspec, piggybacked": lambda: prefill_serving.PiggybackedSmartSpec(
              *pair, gamma, chunk=CHUNK),
          "split": lambda: prefill_serving.SplitARSlots(model, params, batch, sampling,
                                                        steps_per_sync)}


def _serve(model, params, name: tuple[str, str], inputs, reference,
           load: tuple[float | None, int | None], policy: str, variant: str, engines, batch: int,
           greedy: SamplingParams) -> dict[str, Any]:
  """One row: trace `name` ((prompts, outputs); its `inputs`, prompts and new-token counts) under
  `load`, (rate, None) for Poisson arrivals at `rate` per second or (None, C) for a closed loop
  of C requests in flight, served by `policy` (its engine `variant`), checked against its AR
  `reference`."""
  (prompts, kind), requests = name, len(inputs[0])
  rate, clients = load
  trace = serving.poisson_trace(*inputs, rate or 1.0)  # closed loop: arrivals set as it runs
  engine, timings = engines[variant] and engines[variant](), {}
  served = (serving.serve_continuous(model, params, trace, batch, greedy, engine=engine,
                                     timings=timings, clients=clients)
            if engine else serving.serve_static(model, params, trace, batch, greedy, timings,
                                                clients))
  equal = all(np.array_equal(s.tokens, r) for s, r in zip(served, reference))
  drafter = ("eagle" if variant.endswith("eagle") else "model" if policy in SPECULATIVE
             else "none")
  return {"policy": policy, "drafter": drafter, "prompts": prompts, "outputs": kind,
          "chunked_prefill": CHUNK if variant.endswith("piggybacked") else 0,
          "phase_split": variant == "split", "rate": rate, "concurrency": clients,
          **serving.summary(served, timings),
          "greedy_equal_ar": equal, "requests": requests, "batch": batch, **_choices(engine)}


def full_slots_rate(model, params, inputs, batch: int, steps_per_sync: int,
                    sampling: SamplingParams) -> float:
  """The trace's ceiling, measured: tokens per second of `continuous_ar`'s call (steps_per_sync
  AR steps) on `batch` slots filled from the trace, with no admission between calls (`inputs`:
  the trace's prompts and new-token counts, which size the slots; a call costs the same
  whether or not its slots' requests have ended)."""
  engine = serving.ARSlots(model, params, batch, sampling, steps_per_sync)
  trace = serving.poisson_trace(*inputs, 1.0)
  (cost,), _ = serving.time_programs([engine.ar_step], engine.init(trace),
                                     lambda s: engine.full(s, trace))
  return batch * steps_per_sync / cost


def _release_programs() -> None:
  """Frees every compiled program. Each holds thousands of memory mappings of its code: the
  programs of every trace at once (about 60 thousand) crossed the usual limit of a process
  (vm.max_map_count, 65,530), and XLA's compiler then failed for want of memory."""
  jax.clear_caches()
  serving.clear_compiled()
  gc.collect()


def run(workdir: str | None, out: str | None, rates: tuple[float, ...] = (2.0, 8.0, 32.0),
        requests: int = 96, batch: int = 8, steps_per_sync: int = 4,
        target_overrides: tuple[str, ...] = (), train_steps: int = 0,
        policies: tuple[str, ...] = POLICIES, long_prompts: bool = True,
        outputs: tuple[str, ...] = OUTPUTS,
        prefills: tuple[str, ...] = ("piggybacked",),
        drafters: tuple[str, ...] = DRAFTERS,
        concurrency: tuple[int, ...] = (1,)) -> dict[str, Any]:
  """Serves `requests` requests at each rate (Poisson arrivals) and in a closed loop at each
  `concurrency` (`paxlike.arrivals`) with each of `policies` on the short prompts with
  each of `outputs` (`continuous_ar` and `smartspec` with each of `prefills`) and, with
  `long_prompts`, the `with_long` trace (uniform outputs; `continuous_ar` with both prefills);
  `target_overrides` and `train_steps` reshape and shorten the target's and the draft's training
  (tests, smoke runs)."""
  for flag, chosen, valid in (("--policies", policies, POLICIES), ("--outputs", outputs, OUTPUTS),
                              ("--prefills", prefills, PREFILLS),
                              ("--drafters", drafters, DRAFTERS)):
    unknown = sorted(set(chosen) - set(valid))
    if unknown:
      raise UserError(f"{flag}: {', '.join(unknown)} not in the serve suite; valid: "
                      f"{', '.join(valid)}")
  if any(c < 1 for c in concurrency):
    raise UserError(f"--concurrency: {', '.join(map(str, concurrency))}; each must be a number "
                    "of requests in flight >= 1")
  if any(r <= 0 for r in rates):
    raise UserError(f"--rates: {', '.join(map(str, rates))}; each must be a number of requests "
                    "per second > 0")
  if not drafters and set(policies) & set(DRAFTED):
    raise UserError(f"--drafters is empty: {', '.join(sorted(set(policies) & set(DRAFTED)))} "
                    f"need one of {', '.join(DRAFTERS)}")
  registry.load_modules()
  root = Path(workdir or Path.home() / ".cache" / "paxlike" / "bench").expanduser()
  short = shortened(train_steps)
  model, params, _ = trained("pair_target", root / "pair_target",
                             [*short, *target_overrides]).restore()
  greedy = SamplingParams(temperature=0.0)
  draft = headed = (None, None)
  drafting = drafting_on_target(root, small=bool(train_steps)) if set(policies) & set(
      SPECULATIVE) else []
  if "tetris" in policies or ("model" in drafters and set(policies) & set(DRAFTED)):
    draft = trained("pair_draft", root / "pair_draft",
                    [*drafting, *short, *target_overrides]).restore()[:2]
  if "eagle" in drafters and set(policies) & set(DRAFTED):  # the head on the frozen target
    continuations = root / "pair_target" / "teacher_text.txt"  # written by drafting_on_target
    headed = trained("pair_eagle", root / "pair_eagle",  # the decode suite's overrides: shared
                     [f"train.init_from={root / 'pair_target'}", f"data.path={continuations}",
                      *short, *target_overrides]).restore()[:2]
  engines = _engines(model, params, draft, headed, batch, steps_per_sync, greedy)
  # runs: ((prompts, outputs), policy, engine variant); traces keyed by (prompts, outputs)

  def variants(p):
    """The engine variants policy p runs: one per drafter, then one per prefill (EAGLE's engines
    admit by a prefill call)."""
    by_drafter = [p]
    if p in DRAFTED:
      by_drafter = [p] * ("model" in drafters) + [f"{p}, eagle"] * ("eagle" in drafters)
    out = []
    for v in by_drafter:
      if p in PIGGYBACKED and v == p:  # AR or model-drafted: one variant per prefill
        out += [v if f == "call" else f"{v}, piggybacked" for f in PREFILLS if f in prefills]
      else:
        out.append(v)
    return out

  runs = [(("short", kind), p, v) for kind in OUTPUTS if kind in outputs
          for p in POLICIES if p in policies for v in variants(p)]
  if "continuous_ar" in policies and len(jax.devices()) >= 2:
    runs += [(("short", kind), "continuous_ar", "split") for kind in OUTPUTS if kind in outputs]
  if long_prompts:
    runs += [(("with_long", "uniform"), "continuous_ar", variant)
             for variant in ("continuous_ar", "continuous_ar, piggybacked")]
  inputs = {(prompts, kind): trace_inputs(requests, outputs=kind,
                                          long_share=LONG_SHARE if prompts == "with_long" else 0)
            for (prompts, kind), _, _ in runs}
  references = {name: serving.reference(model, params, serving.poisson_trace(*pair, 1.0), greedy)
                for name, pair in inputs.items()}
  rows = []
  loads = [(r, None) for r in rates] + [(None, c) for c in concurrency]
  for name in inputs:  # a trace's programs are freed before the next trace's are compiled
    for load in loads:  # the ceiling measured beside each load's runs
      ceiling = round(full_slots_rate(model, params, inputs[name], batch, steps_per_sync,
                                      greedy), 1)
      rows += [{**row, "full_slots_throughput": ceiling,
                "share_of_full_slots": round(row["throughput"] / ceiling, 3)}
               for row in (_serve(model, params, name, inputs[name], references[name], load,
                                  policy, variant, engines, batch, greedy)
                           for trace, policy, variant in runs if trace == name)]
    _release_programs()
  harness.print_table(rows, ["policy", "drafter", "prompts", "outputs", "chunked_prefill",
                             "phase_split", "rate", "concurrency", "throughput", "ttft_p50",
                             "ttft_p99", "tpot_p50", "tpot_p99", "itl_p50", "itl_p99", "busy_share",
                             "share_of_full_slots", "greedy_equal_ar"])
  config = {"target": "pair_target", "draft": "pair_draft", "eagle": "pair_eagle",
            "drafters": list(drafters), "eagle_draft_tokens": EAGLE_DRAFT_TOKENS,
            "rates": list(rates), "concurrency": list(concurrency),
            "requests": requests, "batch": batch, "steps_per_sync": steps_per_sync,
            "num_draft_tokens": NUM_DRAFT_TOKENS, "policies": list(policies),
            "prompt_bytes": list(PROMPT_BYTES), "long_prompt_bytes": list(LONG_PROMPT_BYTES),
            "long_share": LONG_SHARE, "long_prompts": long_prompts, "chunk": CHUNK,
            "prefills": list(prefills), "new_tokens": list(NEW_TOKENS), "outputs": list(outputs),
            "tail_new_tokens": list(TAIL_NEW_TOKENS)}
  return harness.write_report(out, "serve", config, rows)

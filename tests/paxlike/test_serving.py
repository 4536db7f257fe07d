"""Serving a request trace: every policy returns each request's batch-1 AR tokens (static and
continuous AR, with prefill piggybacked on decode steps and with prefill and decode on two
devices, greedy and sampled; the speculative ones, SmartSpec also piggybacked, greedy), and the
`serve` bench writes its rows (shortened)."""

import dataclasses
import json

import numpy as np
import pytest

from models.causal_lm import CausalLM
from models.config import DraftHeadsConfig, ModelConfig
from models.eagle import EagleLM
import jax

from paxlike import arrivals, prefill_serving, serving, speculative_serving, timing
from samplers import continuous
from paxlike.bench import serve_suite
from paxlike.errors import UserError
from samplers.core.logits import SamplingParams
from tests.models.random_params import random_params


MODEL = CausalLM(ModelConfig(vocab_size=32, num_layers=1, d_model=32, num_heads=4,
                             num_kv_heads=2, mlp_dim=64, max_len=64, init_std=0.5,
                             tie_embeddings=False))


def _trace():
  rng = np.random.default_rng(0)
  prompts = [rng.integers(1, 32, rng.integers(2, 9)) for _ in range(7)]
  return serving.poisson_trace(prompts, rng.integers(2, 20, 7).tolist(), rate=100.0)


def test_static_and_continuous_policies_return_each_requests_own_decode():
  model, params, trace = MODEL, random_params(MODEL), _trace()
  assert all(a.arrival_s < b.arrival_s for a, b in zip(trace, trace[1:]))
  for temperature in (0.0, 1.0):
    sampling = SamplingParams(temperature=temperature)
    reference = serving.reference(model, params, trace, sampling)
    chunked = prefill_serving.PiggybackedARSlots(model, params, 3, sampling, steps_per_sync=2,
                                                 chunk=3)
    split = prefill_serving.SplitARSlots(model, params, 3, sampling, steps_per_sync=2)
    timings = [{}, {}, {}, {}]
    runs = (serving.serve_static(model, params, trace, 3, sampling, timings[0]),
            serving.serve_continuous(model, params, trace, 3, sampling, 2, timings=timings[1]),
            serving.serve_continuous(model, params, trace, 3, sampling, engine=chunked,
                                     timings=timings[2]),
            serving.serve_continuous(model, params, trace, 3, sampling, engine=split,
                                     timings=timings[3]))
    for served, recorded in zip(runs, timings):
      for s, want in zip(served, reference):
        np.testing.assert_array_equal(s.tokens, want)
        assert s.arrival_s <= s.first_token_s <= s.done_s
      summary = serving.summary(served, recorded)
      kinds = ("batch",) if recorded is timings[0] else ("admit", "advance")
      assert sorted(recorded) == sorted(kinds) and 0 < summary["busy_share"] <= 1, summary
      assert all(summary[f"calls_{k}"] >= 1 and summary[f"seconds_{k}"] > 0 for k in kinds)
      assert summary["throughput"] > 0 and summary["ttft_p50"] <= summary["ttft_p99"]
      assert 0 < summary["itl_p50"] <= summary["itl_p99"]
      assert all(len(s.gaps) <= len(s.tokens) - 1 for s in served)


def test_a_closed_loop_sends_the_next_request_whenever_one_is_done():
  trace = _trace()
  waiting = arrivals.Arrivals(trace, clients=2)
  assert [waiting.take(0.0), waiting.take(0.0), waiting.take(0.0)] == [trace[0], trace[1], None]
  waiting.finished(trace[1], 0.5)  # the next unsent request (trace[2]) is sent at 0.5
  assert waiting.take(0.4) is None and waiting.take(0.5) is trace[2]
  assert waiting.arrival_s(trace[2]) == 0.5 and not waiting
  waiting.finished(trace[0], 0.7)
  assert waiting.take(0.7) is trace[3]
  open_loop = arrivals.Arrivals(trace)
  assert open_loop.next_arrival() == trace[0].arrival_s and open_loop.take(0.0) is None
  with pytest.raises(ValueError, match="at least one client"):
    arrivals.Arrivals(trace, clients=0)


@pytest.mark.parametrize("clients", [1, 2])
def test_closed_loop_serving_returns_each_requests_decode_sent_as_others_finish(clients):
  model, params, trace = MODEL, random_params(MODEL), _trace()
  greedy = SamplingParams(temperature=0.0)
  reference = serving.reference(model, params, trace, greedy)
  for served in (serving.serve_static(model, params, trace, 3, greedy, clients=clients),
                 serving.serve_continuous(model, params, trace, 3, greedy, 2,
                                          clients=clients)):
    for s, want in zip(served, reference):
      np.testing.assert_array_equal(s.tokens, want)
    assert all(s.arrival_s == 0.0 for s in served[:clients])
    # the later requests are sent, in trace order, as the earliest finishes happen
    done = sorted(s.done_s for s in served)
    assert [s.arrival_s for s in served[clients:]] == done[:len(served) - clients]
    if clients == 1:  # one at a time
      assert all(a.done_s <= b.arrival_s for a, b in zip(served, served[1:]))


def test_speculative_policies_return_each_requests_greedy_decode():
  params = random_params(MODEL)
  draft = jax.tree.map(lambda x: x + 0.01 * jax.random.normal(jax.random.key(1), x.shape), params)
  trace, greedy = _trace(), SamplingParams(temperature=0.0)
  reference = serving.reference(MODEL, params, trace, greedy)
  pair = (MODEL, params, MODEL, draft, 3, greedy)
  engines = {"continuous_speculative": speculative_serving.FixedGamma(*pair, gamma=2),
             "smartspec": speculative_serving.SmartSpec(*pair, max_draft_tokens=3),
             "smartspec, piggybacked": prefill_serving.PiggybackedSmartSpec(
                 *pair, max_draft_tokens=3, chunk=3),
             "tetris": speculative_serving.Tetris(*pair, max_draft_tokens=3, budget=4),
             "tetris, packed": speculative_serving.Tetris(*pair, max_draft_tokens=3, budget=4,
                                                          packed=True)}
  for name, engine in engines.items():
    served = serving.serve_continuous(MODEL, params, trace, 3, greedy, engine=engine)
    for s, want in zip(served, reference):
      np.testing.assert_array_equal(s.tokens, want, err_msg=name)
  smartspec, tetris = engines["smartspec"], engines["tetris"]
  assert smartspec.chosen.sum() > 0 and engines["smartspec, piggybacked"].calls_piggybacked >= 7
  for engine in (smartspec, tetris, engines["tetris, packed"]):  # per program and row count
    assert sorted(engine.costs) == [1, 2, 3]
    assert all(c.shape == (4,) and np.all(c > 0) for c in engine.costs.values())


def test_eagle_policies_return_each_requests_greedy_decode():
  """The EAGLE-drafted engines (the target's own head, `samplers.continuous_eagle`)."""
  model = EagleLM(dataclasses.replace(MODEL.config, draft_heads=DraftHeadsConfig(eagle=True)))
  params, trace, greedy = random_params(model), _trace(), SamplingParams(temperature=0.0)
  reference = serving.reference(model, params, trace, greedy)
  engines = {"continuous_speculative": speculative_serving.EagleFixedGamma(
                 model, params, 3, greedy, 3),
             "smartspec": speculative_serving.EagleSmartSpec(model, params, 3, greedy, 3)}
  for name, engine in engines.items():
    served = serving.serve_continuous(model, params, trace, 3, greedy, engine=engine)
    for s, want in zip(served, reference):
      np.testing.assert_array_equal(s.tokens, want, err_msg=name)
  smartspec = engines["smartspec"]
  assert smartspec.chosen.sum() > 0 and sorted(smartspec.costs) == [1, 2, 3]
  assert all(c.shape == (4,) and np.all(c > 0) for c in smartspec.costs.values())
  assert all(c == 0 for c in smartspec.catch_up_costs.values())  # the head never lags
  with pytest.raises(ValueError, match=r"steps_per_sync <= max_draft_tokens \+ 1 = 3, got 4"):
    speculative_serving.EagleSmartSpec(model, params, 3, greedy, 2)


@pytest.mark.slow
def test_serve_suite_rows(tmp_path):
  out = tmp_path / "serve.json"
  small = ("model.num_layers=1", "model.d_model=64", "model.num_heads=2", "model.num_kv_heads=2",
           "model.mlp_dim=128", "eval.batches=1")
  report = serve_suite.run(str(tmp_path / "cache"), str(out), rates=(50.0, 400.0), requests=6,
                           batch=3, target_overrides=small, train_steps=2, concurrency=(2,))
  assert json.loads(out.read_text())["suite"] == "serve"
  rows = report["rows"]
  loads, outputs = ((50.0, None), (400.0, None), (None, 2)), serve_suite.OUTPUTS
  chunk = serve_suite.CHUNK
  drafters = lambda p: (serve_suite.DRAFTERS if p in serve_suite.DRAFTED else
                        ("model",) if p in serve_suite.SPECULATIVE else ("none",))
  piggybacked = lambda p, d: p in serve_suite.PIGGYBACKED and d != "eagle"
  assert {(r["policy"], r["drafter"], r["prompts"], r["outputs"], r["chunked_prefill"],
           r["phase_split"], (r["rate"], r["concurrency"])) for r in rows} == {
      *[(p, d, "short", o, chunk if piggybacked(p, d) else 0, False, load)
        for p in serve_suite.POLICIES for d in drafters(p) for o in outputs for load in loads],
      *[("continuous_ar", "none", "short", o, 0, True, load) for o in outputs  # 8 test devices
        for load in loads],
      *[("continuous_ar", "none", "with_long", "uniform", c, False, load) for c in (0, chunk)
        for load in loads]}
  for row in rows:
    assert row["greedy_equal_ar"], row
    for key in ("throughput", "ttft_p50", "ttft_p99", "tpot_p50", "tpot_p99", "itl_p50",
                "itl_p99"):
      assert row[key] >= 0
    assert row["full_slots_throughput"] > 0 and 0 < row["busy_share"] <= 1
    assert row["share_of_full_slots"] == round(row["throughput"] / row["full_slots_throughput"],
                                               3)
    if row["policy"] == "tetris":  # every round counted once by width and once by depth
      assert sum(row["rounds_per_width"]) == sum(row["rounds_per_depth"]) > 0
      assert row["rounds_per_depth"][0] == 0 and set(row["draft_step_s"]) == {"1", "2", "3"}


def test_smartspec_picks_the_gamma_with_the_most_expected_tokens_per_second():
  params = random_params(MODEL)
  engine = speculative_serving.SmartSpec(MODEL, params, MODEL, params, 3,
                                         SamplingParams(temperature=0.0), max_draft_tokens=3)
  a = 0.8
  engine.counts = np.asarray([a, 1 - a])
  np.testing.assert_allclose(engine.expected_tokens(),
                             [4, 1 + a, 1 + a + a ** 2, 1 + a + a ** 2 + a ** 3])
  engine.init(_trace())
  cheap_rounds = np.asarray([4.0, 1.0, 1.0, 1.0])  # 4 AR steps cost 4 rounds
  engine.costs[3] = cheap_rounds
  chosen = []
  engine.program = lambda gamma, rows: chosen.append(gamma) or (lambda s: s)
  engine._counters = lambda slots: engine.seen
  lag = [0]
  engine._lag = lambda slots: lag[0]
  engine.catch_up_costs[3] = 0.25  # per token the draft lags
  engine.advance(None, 3)
  assert chosen == [3]  # 2.95 tokens per unit against AR's 1
  lag[0] = 12  # a round first catches the draft up: 3 units more
  engine.advance(None, 3)
  assert chosen == [3, 0]  # 2.95 / 4 < 4 / 4
  lag[0] = 0
  engine.costs[3] = np.asarray([1.0, 1.0, 1.0, 1.0])  # AR steps as cheap as a round
  engine.advance(None, 3)
  assert chosen == [3, 0, 0]


class _Clock:
  """A fake `time` module: programs advance it by what they "take"."""

  def __init__(self):
    self.now = 0.0

  def perf_counter(self) -> float:
    return self.now

  def sleep(self, seconds: float) -> None:
    self.now += seconds


def test_smartspec_corrects_a_misjudged_cost_while_serving(monkeypatch):
  """A round the warm-up priced too cheap is chosen until its measured calls (each moving its
  cost COST_RATE of the way, at most to STALL times it) make AR steps the better buy; a stalled
  call moves a cost no further than STALL times it; a round's measured time less the catch-up it
  was priced for (at least half of it) is what moves its cost."""
  clock = _Clock()
  monkeypatch.setattr(speculative_serving, "time", clock)
  params = random_params(MODEL)
  engine = speculative_serving.SmartSpec(MODEL, params, MODEL, params, 3,
                                         SamplingParams(temperature=0.0), max_draft_tokens=1)
  engine.init(_trace())
  engine.counts = np.asarray([0.95, 0.05])  # 1.95 tokens per 1-draft round
  engine.costs[3] = np.asarray([0.04, 0.015])  # seconds; 4 AR steps: 100 tokens/s
  took = {0: 0.04, 1: 0.05}  # a round really takes 50 ms: 39 tokens/s
  chosen = []
  engine.program = lambda gamma, rows: chosen.append(gamma) or (
      lambda s: clock.sleep(took[gamma]))
  engine._counters = lambda slots: engine.seen
  engine._lag = lambda slots: 0
  for _ in range(5):
    engine.advance(None, 3)
  assert chosen == [1, 1, 0, 0, 0]  # costs 0.015 -> 0.018 (capped at 0.045) -> 0.0212
  np.testing.assert_allclose(engine.costs[3], [0.04, 0.0212])
  took[0] = 1.0  # a stall: counted as 3 x 0.04
  engine.advance(None, 3)
  np.testing.assert_allclose(engine.costs[3][0], 0.04 + 0.1 * (0.12 - 0.04))
  engine.costs[3] = np.asarray([1.0, 0.02])  # a round after a lag priced at 30 ms
  engine._lag, engine.catch_up_costs[3] = (lambda slots: 30), 0.001
  engine.advance(None, 3)  # 50 ms less 30 is under half of 50: 25 ms moves the cost
  assert chosen[-1] == 1
  np.testing.assert_allclose(engine.costs[3][1], 0.02 + 0.1 * (0.025 - 0.02))


def test_time_programs_interleaves_and_resets_each_program(monkeypatch):
  clock, calls = _Clock(), []
  monkeypatch.setattr(timing, "time", clock)
  program = lambda name, seconds: lambda s: calls.append(name) or clock.sleep(seconds) or s
  costs, out = serving.time_programs([program("fast", 0.001), program("slow", 0.01)], "slots",
                                     reset=lambda s: calls.append("reset") or s, passes=2,
                                     repeats=2)
  assert out == "slots"
  np.testing.assert_allclose(costs, [0.001, 0.01])
  pass_calls = ["reset", "fast", "fast", "fast", "reset", "slow", "slow", "slow"]
  assert calls == pass_calls * 2


def test_piggybacking_carries_one_chunk_and_prefills_the_other_short_prompts_at_once(
    monkeypatch):
  """Three prompts arrive together: the first rides the next call's step, the other short one is
  prefilled in one call beside it, and the long one (over `chunk` tokens) waits, then rides
  three calls in chunks; then the engine's own AR steps run."""
  params = random_params(MODEL)
  engine = prefill_serving.PiggybackedARSlots(MODEL, params, 3, SamplingParams(temperature=0.0),
                                              chunk=8)
  prompt = lambda n: np.arange(1, n + 1, dtype=np.int32)
  first, short, long = (serving.Request(prompt(n), 16, 0.0, i) for i, n in enumerate((5, 6, 20)))
  slots = engine.admit_all(engine.init([first, short, long]), [(0, first), (1, short),
                                                                (2, long)])
  calls = []
  engine.prefill_call = lambda s, pairs: calls.append(("prefill", [p[0] for p in pairs])) or s
  engine.ar_step = lambda s, rows=None: calls.append(("ar",)) or s
  monkeypatch.setattr(prefill_serving.chunked_prefill, "step_piggybacked",
                      lambda model, params, s, slot, config, width, *rest:
                      calls.append(("chunk", int(slot[0]), width)) or s)
  for _ in range(5):
    slots = engine.advance(slots)
  assert calls == [("prefill", [1]), ("chunk", 0, 8), ("chunk", 2, 8), ("chunk", 2, 8),
                   ("chunk", 2, 8), ("ar",)]
  assert engine.calls_piggybacked == 4 and not engine.pending


def test_an_unknown_serving_policy_output_distribution_prefill_or_drafter_is_named():
  with pytest.raises(UserError, match="--policies: fastest not in the serve suite; valid: static"):
    serve_suite.run(None, None, policies=("static", "fastest"))
  with pytest.raises(UserError, match="--outputs: zipf not in the serve suite; valid: uniform, "
                                      "long_tail"):
    serve_suite.run(None, None, outputs=("zipf",))
  with pytest.raises(UserError, match="--prefills: eager not in the serve suite; valid: call, "
                                      "piggybacked"):
    serve_suite.run(None, None, prefills=("eager",))
  with pytest.raises(UserError, match="--drafters: human not in the serve suite; valid: model, "
                                      "eagle"):
    serve_suite.run(None, None, drafters=("human",))
  with pytest.raises(UserError, match="--drafters is empty: smartspec need one of model, eagle"):
    serve_suite.run(None, None, policies=("smartspec",), drafters=())
  with pytest.raises(UserError, match="--concurrency: 2, 0; each must be a number of requests"):
    serve_suite.run(None, None, concurrency=(2, 0))
  with pytest.raises(UserError, match="--rates: 8.0, 0.0; each must be a number of requests per"):
    serve_suite.run(None, None, rates=(8.0, 0.0))


def test_the_two_output_distributions_share_prompts_and_mean():
  """The traces differ only in their new-token counts: uniform 16-96, and the cut exponential
  whose mean is the same 56 and whose tail reaches far past the uniform's 96."""
  prompts, uniform = serve_suite.trace_inputs(4000)
  tail_prompts, tail = serve_suite.trace_inputs(4000, outputs="long_tail")
  assert all(np.array_equal(a, b) for a, b in zip(prompts, tail_prompts))
  assert (min(uniform), max(uniform)) == serve_suite.NEW_TOKENS
  least, _, most = serve_suite.TAIL_NEW_TOKENS
  assert least == min(tail) and max(tail) <= most
  assert abs(np.mean(uniform) - 56) < 1.5 and abs(np.mean(tail) - 56) < 2.5
  assert np.std(tail) > 1.6 * np.std(uniform)
  assert np.mean(np.asarray(tail) > 96) > 0.1  # the uniform's most, exceeded by an eighth


def test_tetris_calibration_is_acceptance_over_mean_top_probability():
  """1 until drafts are seen; then the running per-draft acceptance over the running mean top
  probability of the verified drafts, clipped to [0.25, 4]."""
  params = random_params(MODEL)
  tetris = speculative_serving.Tetris(MODEL, params, MODEL, params, 2,
                                      SamplingParams(temperature=0.0), max_draft_tokens=3)
  assert float(tetris.calibration()) == 1.0
  tetris.observed = np.asarray([8.0, 2.0, 5.0, 10.0])  # acceptance 0.8, mean top probability 0.5
  assert float(tetris.calibration()) == pytest.approx(1.6)
  tetris.observed = np.asarray([1.0, 0.0, 0.1, 10.0])  # 1 / 0.01, clipped
  assert float(tetris.calibration()) == 4.0


@pytest.mark.parametrize("policy", ["continuous_ar", "smartspec"])
def test_every_admission_shape_is_compiled_before_the_clock(policy):
  """Slots a program returned carry other shardings than fresh ones; `compile_admits` compiles
  each (rows, width) admission for both, so none compiles while serving."""
  params, greedy = random_params(MODEL), SamplingParams(temperature=0.0)
  draft = jax.tree.map(lambda x: x * 1.01, params)
  trace = _trace()
  engine = (serving.ARSlots(MODEL, params, 4, greedy) if policy == "continuous_ar" else
            speculative_serving.SmartSpec(MODEL, params, MODEL, draft, 4, greedy, 2))
  slots = engine.warm_up(engine.compile_admits(engine.init(trace), trace), trace)
  compiled = continuous.admit._cache_size()
  for rows in engine.row_buckets():
    slots = engine.advance(engine.admit_all(slots, [(s, trace[s]) for s in range(rows)]))
  assert continuous.admit._cache_size() == compiled


def test_trace_inputs_names_an_unknown_output_distribution():
  with pytest.raises(ValueError, match="outputs='zipf'; valid: uniform, long_tail"):
    serve_suite.trace_inputs(4, outputs="zipf")

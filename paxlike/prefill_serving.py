"""Continuous engines that change how prompts enter (`paxlike.serving.serve_continuous`):

* `Piggybacked` (chunked prefill inside decode steps, Sarathi-Serve; Agrawal et al. 2024): a
  prompt enters its slot in chunks carried by the other slots' decode steps, one model call for
  both, so decodes never wait for a whole prefill and the weights are read once for the two.
  A mixin: `PiggybackedARSlots` is `continuous_ar` with it, and `PiggybackedSmartSpec`
  SmartSpec with it.
* `SplitARSlots` (phase splitting, Splitwise; Patel et al. 2024): admissions prefill on one
  device while the slots decode on another, and the prefilled rows are handed over.

Each request's tokens stay its batch-1 AR decode (tested in tests/paxlike/test_serving.py).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from paxlike.serving import ARSlots, Request, pad_to_width
from paxlike.speculative_serving import SmartSpec
from samplers import chunked_prefill, continuous
from samplers.core.logits import SamplingParams


class SplitARSlots(ARSlots):
  """`continuous_ar` with prefill and decode on different devices (Splitwise, Patel et al. 2024,
  "Splitwise: Efficient Generative LLM Inference Using Phase Splitting"): admissions prefill on
  `prefill_device`, the slots decode on `decode_device`, and the prefilled rows (their caches
  and first tokens) are handed over with `jax.device_put`. An admission is dispatched without
  waiting; the next `advance` dispatches the decode steps first, so that the prefill runs beside
  them, then places the rows into their slots."""

  deferred_admission = True

  def __init__(self, model, params, num_slots: int, sampling: SamplingParams,
               steps_per_sync: int = 4, prefill_device=None, decode_device=None):
    devices = jax.devices()
    if len(devices) < 2 and (prefill_device is None or decode_device is None):
      raise ValueError("phase splitting needs two devices (prefill, decode); this process has "
                       f"{len(devices)}")
    self.prefill_device = prefill_device or devices[0]
    self.decode_device = decode_device or devices[1]
    super().__init__(model, jax.device_put(params, self.decode_device), num_slots, sampling,
                     steps_per_sync)
    self.prefill_params = jax.device_put(params, self.prefill_device)
    self.handover = []

  def init(self, requests: list[Request]) -> continuous.Slots:
    self.handover = []
    return jax.device_put(super().init(requests), self.decode_device)

  def admit_all(self, slots, pairs: list[tuple[int, Request]]):
    slot, *inputs = jax.device_put(self.admission(pairs), self.prefill_device)
    rows = continuous.fill(self.model, self.prefill_params, *inputs, self.config)
    self.handover.append((slot, rows))
    return slots

  def advance(self, slots, rows: int | None = None):
    slots = self.ar_step(slots, rows)
    for slot, prefilled in self.handover:
      slots = continuous.place(slots, *jax.device_put((slot, prefilled), self.decode_device))
    self.handover = []
    return slots


CHUNK_QUANTUM = 32  # piggybacked chunks are padded to a multiple of this many tokens


@dataclasses.dataclass(eq=False)
class _Pending:
  """A request in its slot whose prompt is not all in the cache: `unfed` tokens still to feed."""

  slot: int
  request: Request
  unfed: int


class Piggybacked:
  """Mixin for an `ARSlots` engine: prompts enter their slots through
  `chunked_prefill.step_piggybacked`, one chunk per call (at most `chunk` tokens, padded to a
  multiple of CHUNK_QUANTUM) carried by the first of `steps_per_sync` AR steps of the other slots,
  oldest prompt first; calls without a chunk run the engine's own program.

  A prompt then costs its own tokens, carried by a decode step, where a prefill call pads it to a
  bucket (64, 128, ... tokens) and reads the weights once more. One chunk per call would make
  prompts that arrive together queue for calls, their slots idle meanwhile; so when a call's
  chunk is taken, the other waiting prompts of at most `chunk` tokens (none fed yet) are
  prefilled together in one call (`prefill_call`), as `ARSlots` admits, and only longer prompts
  wait for their turn (no call then stalls the slots for more than a chunk). The draft's cache,
  if any, is fed the same chunks. `calls_piggybacked` counts the calls that carried a chunk while
  serving."""

  chunk = 64

  def init(self, requests: list[Request]) -> continuous.Slots:
    self.pending: list[_Pending] = []  # oldest first
    self.calls_piggybacked = 0
    return super().init(requests)

  def admit_all(self, slots, pairs: list[tuple[int, Request]]):
    for slot, r in pairs:
      prompt, length = pad_to_width([r.prompt], self.config.prompt_width)
      self.pending.append(_Pending(slot, r, int(length[0])))
      slots = chunked_prefill.enqueue(slots, jnp.int32(slot), jnp.asarray(prompt[0]),
                                      jnp.int32(length[0]), jax.random.key(r.seed),
                                      jnp.int32(r.max_new_tokens), self.config)
    return slots

  def compile_admits(self, slots, requests: list[Request]):
    """The prefill calls of the prompts that cannot ride a call (`ARSlots.compile_admits`)."""
    return super().compile_admits(slots, requests, admit=self.prefill_call)

  def chunk_widths(self) -> list[int]:
    """The chunk widths programs are compiled for: multiples of CHUNK_QUANTUM up to `chunk`,
    capped by the longest prompt and by the room `chunked_prefill.check_chunk` allows."""
    cap = min(self.chunk, self.config.prompt_width,
              self.config.max_new_tokens + self.config.max_draft_tokens)
    return sorted({min(w, cap) for w in range(CHUNK_QUANTUM, self.chunk + CHUNK_QUANTUM,
                                             CHUNK_QUANTUM)})

  def piggyback(self, slots, rows: int | None = None):
    """One call carrying the oldest incomplete prompt's next chunk, after one prefill call of
    the other waiting short prompts (class docstring)."""
    carried, rest = self.pending[0], self.pending[1:]
    short = [e for e in rest if e.unfed == len(e.request.prompt) <= self.chunk]
    if short:
      slots = self.prefill_call(slots, [(e.slot, e.request) for e in short])
      self.pending = [carried] + [e for e in rest if e not in short]
    width = next((w for w in self.chunk_widths() if w >= carried.unfed),
                 self.chunk_widths()[-1])
    slots = chunked_prefill.step_piggybacked(
        self.model, self.params, slots, jnp.asarray([carried.slot], jnp.int32), self.config,
        width, self.steps_per_sync, rows, self.draft, self.draft_params)
    carried.unfed -= width
    if carried.unfed <= 0:
      self.pending.pop(0)
    self.calls_piggybacked += 1
    return slots

  def advance(self, slots, rows: int | None = None):
    return self.piggyback(slots, rows) if self.pending else super().advance(slots, rows)

  def warm_up(self, slots, requests: list[Request]):
    """Compiles the piggybacked program for every (rows, chunk width), on fresh slots (the
    first call after `init` sees those) and twice on returned ones, and the calls without a
    chunk, then the engine's own warm-up."""
    prompt = max((r.prompt for r in requests), key=len)
    for rows in self.row_buckets():
      for width in self.chunk_widths():
        for fresh in (True, False, False):
          pair = (0, dataclasses.replace(requests[0], prompt=prompt[:width]))
          slots = self.admit_all(self.init(requests) if fresh else slots, [pair])
          while self.pending:
            slots = self.advance(slots, rows)
      for _ in range(2):  # AR steps alone (SmartSpec's gamma = 0)
        slots = self.ar_step(slots, rows)
    return super().warm_up(slots, requests)


class PiggybackedARSlots(Piggybacked, ARSlots):
  """`continuous_ar` with prompts prefilled in chunks of at most `chunk` tokens inside the
  decode steps (`Piggybacked`)."""

  def __init__(self, model, params, num_slots: int, sampling: SamplingParams,
               steps_per_sync: int = 4, chunk: int = 64):
    super().__init__(model, params, num_slots, sampling, steps_per_sync)
    self.chunk = chunk


class PiggybackedSmartSpec(Piggybacked, SmartSpec):
  """`smartspec` with prompts prefilled inside decode steps (`Piggybacked`): a call that carries
  a chunk is AR steps; the others choose gamma by expected goodput (`SmartSpec`)."""

  def __init__(self, *args, chunk: int = 64, **kwargs):
    super().__init__(*args, **kwargs)
    self.chunk = chunk

"""Continuous AR engines that change how prompts enter (`paxlike.serving.serve_continuous`):

* `ChunkedARSlots` (chunked prefill, Sarathi-Serve; Agrawal et al. 2024): a long prompt enters
  its slot in chunks, one per call beside the other slots' AR steps, so decodes never wait for a
  whole long prefill.
* `SplitARSlots` (phase splitting, Splitwise; Patel et al. 2024): admissions prefill on one
  device while the slots decode on another, and the prefilled rows are handed over.

Each request's tokens stay its batch-1 AR decode (tested in tests/paxlike/test_serving.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from paxlike.serving import ARSlots, Request, pad_to_width
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


class ChunkedARSlots(ARSlots):
  """`continuous_ar` with chunked prefill (`samplers.chunked_prefill`): a prompt longer than
  `chunk` tokens enters its slot without computing anything, and each call feeds the oldest
  incomplete prompt's next `chunk` tokens before its `steps_per_sync` AR steps; shorter prompts
  are admitted as by `ARSlots` (one prefill call for all of them)."""

  def __init__(self, model, params, num_slots: int, sampling: SamplingParams,
               steps_per_sync: int = 4, chunk: int = 64):
    super().__init__(model, params, num_slots, sampling, steps_per_sync)
    self.chunk, self.pending = chunk, []  # [slot, prompt tokens not yet fed]

  def init(self, requests: list[Request]) -> continuous.Slots:
    self.pending = []
    return super().init(requests)

  def enqueue(self, slots, slot: int, r: Request):
    prompt, length = pad_to_width([r.prompt], self.config.prompt_width)
    self.pending.append([slot, int(length[0])])
    return chunked_prefill.enqueue(slots, jnp.int32(slot), jnp.asarray(prompt[0]),
                                   jnp.int32(length[0]), jax.random.key(r.seed),
                                   jnp.int32(r.max_new_tokens), self.config)

  def admit_all(self, slots, pairs: list[tuple[int, Request]]):
    short = [(slot, r) for slot, r in pairs if len(r.prompt) <= self.chunk]
    if short:
      slots = super().admit_all(slots, short)
    for slot, r in pairs:
      if len(r.prompt) > self.chunk:
        slots = self.enqueue(slots, slot, r)
    return slots

  def warm_up(self, slots, requests: list[Request]):
    for rows in self.row_buckets():
      for _ in range(2):
        slots = self.enqueue(slots, 0, requests[0])
        while self.pending:  # chunks with AR steps
          slots = self.advance(slots, rows)
        slots = self.advance(slots, rows)  # AR steps alone
    return slots

  def advance(self, slots, rows: int | None = None):
    if not self.pending:
      return self.ar_step(slots, rows)
    slot, left = self.pending[0]
    slots = chunked_prefill.step_with_chunk(self.model, self.params, slots, jnp.int32(slot),
                                            self.config, self.chunk, self.steps_per_sync, rows)
    self.pending[0][1] -= self.chunk
    if self.pending[0][1] <= 0:
      self.pending.pop(0)
    return slots

"""The machinery the sampling algorithms share (the algorithms are the modules of `samplers`).

- `protocol`, `denoiser_protocol`: what a model must offer (causal LM; denoiser, any-subset AR),
  and the common `SampleOutput`.
- `logits`: temperature, top-k, top-p and greedy (`SamplingParams`).
- `rng`: per-row, per-position randomness, so a row's result never depends on its batch.
- `emit`: the done / eos / padding / lengths bookkeeping of decode loops.
- `draft_verify`: the compiled draft-then-verify loop; `verify`: per-position acceptance rules;
  `optimal`: the optimal acceptance of k i.i.d. drafts.
- `tree_shape`, `tree_walk`: static token trees and their verification walk.
- `slots`, `rows`: cache slot compaction, and model calls over per-row caches.
- `canvas`, `refill`: the diffusion-style samplers' canvas and continuous batching.
- `cond_calls`: counting the calls a `lax.cond` skips, honest under `jax.vmap` (where it runs both
  branches).
"""

"""Samplers: decoding algorithms as pure, jitted functions over a small model protocol.

Algorithms (each module: a frozen config, a jitted `sample`, an options dataclass and a `SPEC`;
`registry` lists them by `sampler.kind`):

- `ar`: autoregressive sampling, the reference.
- `speculative`, `spectr`, `tree` (static and dynamic trees), `adaptive`: exact
  draft-then-verify decoding.
- `jacobi`: greedy Jacobi fixed-point decoding.
- `contrastive`, `entropy_switch`: two-model decoders (expert/amateur, small/large).
- `mdlm`, `unmask`, `block_diffusion`, `edlm`, `learned_unmask`: masked-diffusion decoding.
- `assd`: exact speculative decoding of any-subset AR models.
- `repeated`, `pruned`: n samples per prompt (repeated sampling, speculative rejection,
  first-finish); `selection` picks one of them.

Machinery they share:

- `protocol`, `denoiser_protocol`: what a model must offer each family.
- `spec`, `registry`: samplers described as data, for the layers above.
- `logits`: temperature, top-k, top-p, greedy.
- `rng`: per-row, per-position randomness (a row never depends on its batch).
- `draft_verify`: the compiled draft-then-verify loop; `verify`: per-position acceptance rules;
  `optimal`: the optimal multi-draft acceptance; `tree_shape`, `tree_walk`: token trees' structure
  and verification; `slots`, `rows`: cache compaction and per-row caches.
- `canvas`, `refill`: the diffusion samplers' canvas and continuous batching.
"""

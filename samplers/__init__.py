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

`core/` holds the machinery they share (model protocols, logit processing, per-row randomness,
the draft-then-verify loop and its acceptance rules, token trees, caches, the diffusion canvas);
`spec` and `registry` describe the algorithms as data for the layers above.
"""

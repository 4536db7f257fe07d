"""Benchmarks: `python -m paxlike.bench SUITE [--out FILE] [--workdir DIR]`.

Each suite prints a table and, with --out, writes
`{"suite", "machine", "versions", "config", "rows": [...]}` with one flat object per row.
Steady-state figures are medians after a compile warm-up, with their spread; compile time is
reported apart.

- `harness`: shared plumbing (cached trained runs, tables, JSON reports, machine facts).
- `train_suite`: train-step throughput and model-FLOPs utilisation against the matmul peak.
- `parallelism_suite`: sharded step time per mesh layout and sequence-parallel attention.
- `decode_suite`: every drafted sampler against AR on a trained pair, interleaved.
- `engine_suite`, `op_profile`: the decode engine against its matmul and bandwidth floors, and
  per-op profiles of compiled decodes.
- `compare_hf_suite`: paxlike against Hugging Face transformers on the same weights.
- `diffusion_suite`: the diffusion-style samplers on the parallel-decoding task suite.
- `scaling_suite`: coverage (pass@k) of repeated sampling against n.
"""

"""Parallelism: the named device mesh, where each logical axis lives, and hand-written collectives.

Depends only on jax and flax (checked by import-linter), so every layer above can use it.

- `mesh`: the ('data', 'fsdp', 'sequence', 'tensor') mesh, including slices across hosts.
- `rules`: logical axis rules (what an array axis means -> which mesh axis shards it).
- `distributed`: multi-process start-up through `jax.distributed`.
- `sequence_attention`: sequence-parallel self-attention, chosen by name; its variants
  `ring_attention`, `ulysses_attention` and `allgather_attention`, with `zigzag` (the load-balanced
  causal layout), `blockwise` (flash-style blocks with their log-sum-exp) and `local_attention`
  (the per-device math they share).
"""

"""Benchmarks: `python -m paxlike.bench SUITE [--out FILE] [--workdir DIR]`.

Each suite prints a table and, with --out, writes
`{"suite", "machine", "versions", "config", "rows": [...]}` with one flat object per row.
Steady-state figures are medians after a compile warm-up, with their spread; compile time is
reported apart.
"""

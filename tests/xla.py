"""The XLA flags of every process the test suite runs: pytest's own and the ones it starts.

`--xla_cpu_use_fusion_emitters=false` compiles elementwise fusions with XLA:CPU's LLVM IR
emitters instead of its MLIR fusion emitters. Compiling is about two thirds of the suite's time,
and this halves the backend's share: measured on seven samplers' programs here, 9.7 s -> 4.4 s
with most optimizations off, 16.4 s -> 10.5 s with them on. What a test compares was compiled
the same way on both sides (one device against a mesh, one process against two), so nothing the
suite proves depends on the emitter.
"""

COMPILE_FAST = "--xla_cpu_use_fusion_emitters=false"


def flags(devices: int) -> str:
  """XLA_FLAGS for a test process with `devices` simulated host CPU devices."""
  return f"{COMPILE_FAST} --xla_force_host_platform_device_count={devices}"

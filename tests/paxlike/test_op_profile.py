"""Per-op profiles: HLO scopes and the charging of concurrent and idle time."""

import jax
import jax.numpy as jnp
import pytest

from paxlike.bench import op_profile

HLO = """
%fused_computation.1 (param_0: f32[4]) -> f32[4] {
  %param_0 = f32[4]{0} parameter(0)
  ROOT %mul.2 = f32[4]{0} multiply(%param_0, %param_0), metadata={op_name="jit(f)/while/body/Transformer.decode/blocks_0/mlp/mul"}
}

ENTRY %main (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  %fusion.1 = f32[4]{0} fusion(%p), kind=kLoop, calls=%fused_computation.1
  %copy.3 = f32[4]{0} copy(%fusion.1)
  ROOT %add.4 = f32[4]{0} add(%copy.3, %p), metadata={op_name="jit(f)/while/body/add"}
}
"""


def test_hlo_scopes_fall_back_to_fused_computations_and_operands():
  scopes = op_profile.hlo_scopes(HLO)
  assert scopes["mul.2"].endswith("mlp/mul")
  assert scopes["fusion.1"] == scopes["mul.2"]  # from its fused computation
  assert scopes["copy.3"] == scopes["fusion.1"]  # from its operand
  assert scopes["add.4"] == "jit(f)/while/body/add"


def test_charge_splits_concurrent_time_and_gives_gaps_to_the_next_thunk():
  events = [(0, 10, "a"), (5, 15, "b"), (20, 30, "c")]  # ns; a and b overlap, then 5 ns idle
  charged = op_profile._charge(events)
  assert charged["a"] == pytest.approx(7.5e-9) and charged["b"] == pytest.approx(7.5e-9)
  assert charged["c"] == pytest.approx(15e-9)
  assert sum(charged.values()) == pytest.approx(30e-9)  # the profiled wall time


def test_profile_of_a_compiled_loop_charges_its_thunks():
  f = jax.jit(lambda x: jax.lax.fori_loop(0, 20, lambda i, y: jnp.tanh(y @ y), x))
  x = jnp.eye(64) * 0.5
  compiled = f.lower(x).compile()
  run = lambda: compiled(x).block_until_ready()
  run()
  ops = op_profile.profile(run, compiled.as_text())
  assert ops and all(o.seconds >= 0 for o in ops)
  split = op_profile.shares(ops)
  assert split["model"] == 0 and split["engine"] > 0  # no model scope in this program
  assert any(o.count >= 20 for o in ops)  # the loop body's thunks ran once per iteration
  assert op_profile.top(ops, 3)[0]["share"] > 0


def test_busy_split_says_when_a_matmul_runs_when_only_others_do_and_when_none_does():
  events = [(0, 10, "dot.1"), (5, 15, "add.2"), (20, 30, "add.3"), (25, 40, "fusion.4")]
  split = op_profile.busy_split(events, {"dot.1", "fusion.4"})
  assert split["matmul_s"] == pytest.approx(25e-9)  # 0-10 and 25-40
  assert split["other_s"] == pytest.approx(10e-9)  # 10-15 and 20-25
  assert split["idle_s"] == pytest.approx(5e-9)  # 15-20


def test_matmul_instructions_are_dots_and_fusions_holding_one():
  hlo = HLO + """
%fused_computation.7 (a: f32[4,4], b: f32[4,4]) -> f32[4,4] {
  %a = f32[4,4]{1,0} parameter(0)
  %b = f32[4,4]{1,0} parameter(1)
  ROOT %dot_general.8 = f32[4,4]{1,0} dot(%a, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %other (x: f32[4,4]) -> f32[4,4] {
  %x = f32[4,4]{1,0} parameter(0)
  %ynn_fusion.9 = f32[4,4]{1,0} fusion(%x, %x), kind=kCustom, calls=%fused_computation.7
  ROOT %dot.10 = f32[4,4]{1,0} dot(%ynn_fusion.9, %x), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}
"""
  found = op_profile.matmul_instructions(hlo)
  assert {"ynn_fusion.9", "dot.10"} <= found
  assert not {"fusion.1", "copy.3", "add.4"} & found

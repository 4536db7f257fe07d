"""The matmul floor of a program: its own matrix products, run bare, timed in the same run.

A train step's time splits into its matrix products and everything else (attention's softmax,
norms, the optimizer update, the runtime between operations). Its matmuls alone bound what any
framework can reach with this machine's kernels: a step can be no faster than the products it
must compute. `step_dots` collects every `dot_general` of a function's jaxpr (forward, the
backward that autodiff and custom VJPs produce, and nested calls, conditionals and loops), with
its operand shapes and dimension numbers; `bare_program` is one jitted program that runs exactly
those products on random operands and nothing else. Timing it beside the real step (interleaved)
gives the floor on the same noisy machine, and `(peer's step) / floor` about the most a system
computing these products with these kernels could gain over the peer (an optimistic bound:
`bare_program`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
from jax.extend import core as jax_core


@dataclasses.dataclass(frozen=True)
class Dot:
  """One matrix product: operand shapes and dtypes, and `lax.dot_general`'s dimension numbers
  ((lhs contracting, rhs contracting), (lhs batch, rhs batch)). `trips`: how many times it runs
  per call (its enclosing loops' trip counts multiplied)."""

  lhs: jax.ShapeDtypeStruct
  rhs: jax.ShapeDtypeStruct
  dimension_numbers: tuple
  trips: int = 1
  precision: Any = None
  preferred_element_type: Any = None

  @property
  def flops(self) -> int:
    """2 x (output elements) x (contracted size), times `trips`."""
    (_, rhs_contract), (_, rhs_batch) = self.dimension_numbers
    free = [n for i, n in enumerate(self.rhs.shape) if i not in rhs_contract + rhs_batch]
    return 2 * math.prod(self.lhs.shape) * math.prod(free) * self.trips


def _sub_jaxprs(params: dict[str, Any]):
  for value in params.values():
    for item in value if isinstance(value, (list, tuple)) else (value,):
      if isinstance(item, jax_core.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jax_core.Jaxpr):
        yield item


def _walk(jaxpr, trips: int, out: list[Dot]) -> None:
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      lhs, rhs = (jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in eqn.invars[:2])
      out.append(Dot(lhs, rhs, eqn.params["dimension_numbers"], trips,
                     eqn.params.get("precision"), eqn.params.get("preferred_element_type")))
      continue
    if eqn.primitive.name == "while":
      raise ValueError("step_dots cannot count the products of a while loop (its trip count "
                       "is not static); express the loop as lax.scan or fori_loop with fixed "
                       "bounds")
    inner = trips * eqn.params.get("length", 1)  # lax.scan's body runs `length` times
    if eqn.primitive.name == "cond":  # one branch runs: count the costliest
      branches = []
      for branch in eqn.params["branches"]:
        branches.append([])
        _walk(branch.jaxpr, inner, branches[-1])
      out += max(branches, key=lambda dots: sum(d.flops for d in dots))
      continue
    for sub in _sub_jaxprs(eqn.params):
      _walk(sub, inner, out)


def step_dots(fn: Callable, *args) -> list[Dot]:
  """Every matrix product one call of `fn(*args)` computes, in program order (a product in a
  scan body is listed once with its `trips`; of a conditional's branches, the costliest)."""
  return jaxpr_dots(jax.make_jaxpr(fn)(*args))


def jaxpr_dots(closed: jax_core.ClosedJaxpr) -> list[Dot]:
  """`step_dots` of a traced program."""
  out: list[Dot] = []
  _walk(closed.jaxpr, 1, out)
  return out


def _random(key, spec: jax.ShapeDtypeStruct) -> jax.Array:
  if jax.numpy.issubdtype(spec.dtype, jax.numpy.inexact):
    return jax.random.normal(key, spec.shape, spec.dtype)
  return jax.random.randint(key, spec.shape, -8, 8).astype(spec.dtype)


def bare_products(dots: list[Dot], seed: int = 0) -> tuple[Callable, list]:
  """(products, operands): a jitted program that computes every product of `dots` (each `trips`
  times) and nothing else, and random operands for it.

  Products whose larger operand has the same shape (a model's layers) share that operand and
  each get their own smaller one, so the operands stay a model's size rather than a copy per
  product (a 10M model's step has 1.6 GB of them). XLA:CPU does not merge such products (each
  stays a dot in the compiled program; tested); a GPU compiler may."""
  keys = iter(jax.random.split(jax.random.key(seed), 2 * sum(d.trips for d in dots)))
  shared, operands, specs = {}, [], []
  for d in dots:
    small, large = sorted((d.lhs, d.rhs), key=lambda s: math.prod(s.shape))
    key = (large.shape, large.dtype)
    if key not in shared:
      shared[key] = _random(next(keys), large)
    for _ in range(d.trips):
      own = _random(next(keys), small)
      operands.append((own, shared[key]) if small is d.lhs else (shared[key], own))
      specs.append(d)

  @jax.jit
  def products(operands):
    return [jax.lax.dot_general(lhs, rhs, d.dimension_numbers, d.precision,
                                d.preferred_element_type)
            for (lhs, rhs), d in zip(operands, specs)]

  return products, operands


def bare_program(dots: list[Dot], seed: int = 0) -> Callable[[], Any]:
  """A call that runs `bare_products` once and waits for it: nothing but the matmuls.

  As a floor it is optimistic: an operand shared across layers may stay in cache where the real
  step reads each layer's own, and independent products may overlap where the step's depend on
  each other."""
  products, operands = bare_products(dots, seed)
  return lambda: jax.block_until_ready(products(operands))  # [each product's output]

"""Checkable synthetic tasks whose answer tokens depend strongly on each other (in the spirit of
ParallelBench, Kang et al. 2025), for parallel decoding and test-time scaling benchmarks.

Each task makes seeded (prompt, reference answer) pairs, checks any answer text, and knows two
exact baselines:

- `chance`: the probability that a uniformly random answer of the right format (answer_length
  characters from the task's alphabet) is correct.
- `independent_chance`: the probability that an answer is correct when each position is drawn
  independently from its marginal under the uniform distribution over correct answers, i.e. what
  a perfect model decoded fully in parallel (one step, product of marginals) scores. It is 1 for
  tasks with one correct answer and below 1 for tasks with many ("perm", "dyck"): the
  factorisation penalty of decoding dependent tokens independently.

A corpus line is `prompt + answer`, padded with spaces to the task's `line_width` - 1 characters,
then a newline, so every line of a suite has the same width and a canvas for one answer is one
line (`canvas_parts`). Two suites (`SUITES`): `short` (the default: answers of 3-8 characters in
lines of LINE_WIDTH) and `long` (answers of 9-16 characters in lines of LONG_WIDTH), where
decoding many answer tokens per model call is possible at all. Training corpus:
`python -m paxlike.tasks --out FILE [--lines N] [--seed S] [--suite long]`, then train with
`--set data.path=FILE`.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from paxlike.errors import UserError

LINE_WIDTH = 24  # characters per corpus line, newline included (divisible by 2, 3, 4, 6, 8, 12)
LONG_WIDTH = 48  # the same for the `long` suite (a multiple of LINE_WIDTH)
LONG = 16  # letters or digits of the long suite's copy, rev, sort and dyck answers
LETTERS = "abcdefgh"
DIGITS = "0123456789"


@dataclasses.dataclass(frozen=True)
class Task:
  """One task.

  Attributes:
    name: short name, also the prompt's tag.
    description: what a correct answer is.
    answer_length: characters per answer.
    alphabet: the characters an answer of the right format uses.
    make: seeded generator rng -> (prompt, one correct answer).
    check: (prompt, answer) -> whether the answer is correct.
    chance, independent_chance: the exact baselines of the module docstring.
    line_width: characters of its corpus lines, newline included.
  """

  name: str
  description: str
  answer_length: int
  alphabet: str
  make: Callable[[np.random.Generator], tuple[str, str]]
  check: Callable[[str, str], bool]
  chance: float
  independent_chance: float
  line_width: int = LINE_WIDTH

  def examples(self, count: int, seed: int) -> list[tuple[str, str]]:
    """`count` seeded (prompt, answer) pairs."""
    rng = np.random.default_rng([seed, _name_seed(self.name)])
    return [self.make(rng) for _ in range(count)]


def _name_seed(name: str) -> int:
  """A stable integer for a task name (seeds differ per task)."""
  return sum((i + 1) * ord(c) for i, c in enumerate(name))


def _items(prompt: str) -> str:
  """The input between the tag and '='."""
  return prompt.split(" ", 1)[1].rstrip("=")


def _letters(rng: np.random.Generator, count: int, distinct: bool = False) -> str:
  return "".join(rng.choice(list(LETTERS), count, replace=not distinct))


def _copy(n: int = 5) -> Task:
  return Task("copy", f"repeat the {n} letters", n, LETTERS,
              lambda rng: ((p := f"copy {_letters(rng, n)}="), _items(p)),
              lambda prompt, answer: answer == _items(prompt), len(LETTERS) ** -n, 1.0)


def _reverse(n: int = 5) -> Task:
  return Task("rev", f"the {n} letters reversed", n, LETTERS,
              lambda rng: ((p := f"rev {_letters(rng, n)}="), _items(p)[::-1]),
              lambda prompt, answer: answer == _items(prompt)[::-1], len(LETTERS) ** -n, 1.0)


def _sort(n: int = 5) -> Task:
  make = lambda rng: ((p := "sort " + "".join(rng.choice(list(DIGITS), n)) + "="),
                      "".join(sorted(_items(p))))
  return Task("sort", f"the {n} digits in ascending order", n, DIGITS, make,
              lambda prompt, answer: answer == "".join(sorted(_items(prompt))),
              len(DIGITS) ** -n, 1.0)


def _add(digits: int = 2) -> Task:
  def make(rng):
    a, b = rng.integers(0, 10 ** digits, 2)
    return f"add {a:0{digits}d}+{b:0{digits}d}=", f"{a + b:0{digits + 1}d}"

  def check(prompt, answer):
    a, b = _items(prompt).split("+")
    return answer == f"{int(a) + int(b):0{digits + 1}d}"

  return Task("add", f"the sum of two {digits}-digit numbers as {digits + 1} digits",
              digits + 1, DIGITS, make, check, len(DIGITS) ** -(digits + 1), 1.0)


def _perm() -> Task:
  n = 4
  def make(rng):
    items = _letters(rng, n, distinct=True)
    return f"perm {items}=", "".join(rng.permutation(list(items)))

  return Task("perm", f"any ordering of the {n} distinct letters", n, LETTERS, make,
              lambda prompt, answer: sorted(answer) == sorted(_items(prompt)),
              math.factorial(n) / len(LETTERS) ** n, math.factorial(n) / n ** n)


def balanced(text: str) -> bool:
  """Whether `text` is a balanced string over '(' and ')'."""
  depth = 0
  for c in text:
    depth += {"(": 1, ")": -1}.get(c, -10**6)
    if depth < 0:
      return False
  return depth == 0


def _dyck_answers(n: int) -> list[str]:
  return ["".join(s) for s in itertools.product("()", repeat=n) if balanced("".join(s))]


def independent_chance(correct: Sequence[str], alphabet: str, check: Callable[[str], bool]) -> float:
  """P(correct) of an answer drawn position by position from the marginals of the uniform
  distribution over the answers `correct`, by enumeration of alphabet^length."""
  length = len(correct[0])
  marginals = [{c: sum(a[i] == c for a in correct) / len(correct) for c in alphabet}
               for i in range(length)]
  total = 0.0
  for text in itertools.product(alphabet, repeat=length):
    if check("".join(text)):
      total += math.prod(marginals[i][c] for i, c in enumerate(text))
  return total


def _dyck(n: int = 8) -> Task:
  answers = _dyck_answers(n)
  return Task("dyck", f"any balanced bracket string of length {n}", n, "()",
              lambda rng: (f"dyck {n}=", answers[rng.integers(len(answers))]),
              lambda prompt, answer: len(answer) == n and balanced(answer),
              len(answers) / 2 ** n, independent_chance(answers, "()", balanced))


def _long(task: Task, suffix: str) -> Task:
  """A long-suite task: the generator's task named with its size suffix, in LONG_WIDTH lines."""
  return dataclasses.replace(task, name=task.name + suffix, line_width=LONG_WIDTH)


TASKS: dict[str, Task] = {t.name: t for t in (_copy(), _reverse(), _sort(), _add(), _perm(),
                                              _dyck())}
LONG_TASKS: dict[str, Task] = {t.name: t for t in (
    _long(_copy(LONG), str(LONG)), _long(_reverse(LONG), str(LONG)),
    _long(_sort(LONG), str(LONG)), _long(_add(8), "8"), _long(_dyck(LONG), str(LONG)))}
SUITES: dict[str, dict[str, Task]] = {"short": TASKS, "long": LONG_TASKS}


def get(names: Sequence[str] | None = None, suite: str = "short") -> list[Task]:
  """The named tasks of any suite, or every task of `suite` when `names` is None; UserError for
  an unknown name or suite."""
  if suite not in SUITES:
    raise UserError(f"unknown task suite {suite!r}; valid: {', '.join(SUITES)}")
  if names is None:
    return list(SUITES[suite].values())
  every = {name: task for suite_tasks in SUITES.values() for name, task in suite_tasks.items()}
  unknown = [n for n in names if n not in every]
  if unknown:
    raise UserError(f"unknown task(s) {', '.join(unknown)}; valid: {', '.join(every)}")
  return [every[n] for n in names]


def line(prompt: str, answer: str, width: int = LINE_WIDTH) -> str:
  """One corpus line: prompt + answer padded with spaces to `width` - 1, then a newline."""
  text = prompt + answer
  if len(text) > width - 1:
    raise ValueError(f"{text!r} is longer than a line ({width - 1} characters)")
  return text.ljust(width - 1) + "\n"


def canvas_parts(task: Task, prompt: str) -> tuple[str, int, str]:
  """(text before the answer, answer length, text after it) of the line that answers `prompt`:
  a decoder fills answer_length positions between two known texts, the task's line_width in all."""
  after = task.line_width - 1 - len(prompt) - task.answer_length
  return prompt, task.answer_length, " " * after + "\n"


def corpus(lines: int, seed: int, names: Sequence[str] | None = None,
           suite: str = "short") -> str:
  """`lines` corpus lines, each from a task drawn uniformly (seeded): of the tasks `names`, or of
  every task of `suite` when None. The tasks must share a line width."""
  tasks = get(names, suite)
  if len({t.line_width for t in tasks}) > 1:
    raise UserError(f"tasks of one corpus share a line width; {', '.join(t.name for t in tasks)} "
                    "mix the short and long suites")
  rng = np.random.default_rng(seed)
  picks = rng.integers(len(tasks), size=lines)
  examples = {t.name: iter(t.examples(int(np.sum(picks == i)), seed))
              for i, t in enumerate(tasks)}
  return "".join(line(*next(examples[tasks[i].name]), tasks[i].line_width) for i in picks)


def write_corpus(path: str | Path, lines: int, seed: int,
                 names: Sequence[str] | None = None, suite: str = "short") -> Path:
  """Writes `corpus(...)` to `path` (parents created) and returns the path."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(corpus(lines, seed, names, suite))
  return path


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description="Write a training corpus of the task suite.")
  parser.add_argument("--out", required=True, help="file to write")
  parser.add_argument("--lines", type=int, default=50_000)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--tasks", default="",
                      help="comma-separated task names (default: all of --suite)")
  parser.add_argument("--suite", default="short", choices=list(SUITES))
  args = parser.parse_args(argv)
  names = [n for n in args.tasks.split(",") if n] or None
  path = write_corpus(args.out, args.lines, args.seed, names, args.suite)
  print(f"wrote {args.lines} lines to {path}")
  for task in get(names, args.suite):
    print(f"  {task.name:<6} {task.description}; chance {task.chance:.3g}, "
          f"independent-position chance {task.independent_chance:.3g}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())

"""The task suite: generators, checkers, corpus lines and exact chance levels (by enumeration)."""

import itertools
import math

import numpy as np
import pytest

from paxlike import tasks
from paxlike.errors import UserError


@pytest.mark.parametrize("task", tasks.get() + tasks.get(suite="long"), ids=lambda t: t.name)
def test_generated_answers_are_correct_and_perturbed_ones_are_not(task):
  for prompt, answer in task.examples(50, seed=0):
    assert len(answer) == task.answer_length and set(answer) <= set(task.alphabet)
    assert task.check(prompt, answer)
    assert not task.check(prompt, answer[:-1])
    if task.name != "perm":  # changing the last character breaks every other task's answer
      wrong = answer[:-1] + next(c for c in task.alphabet if c != answer[-1])
      assert not task.check(prompt, wrong)
  assert task.examples(5, seed=1) == task.examples(5, seed=1)
  assert task.examples(5, seed=1) != task.examples(5, seed=2)


@pytest.mark.parametrize("task", tasks.get(), ids=lambda t: t.name)
def test_chance_level_equals_enumeration(task):
  """Fraction of all alphabet^length answers that are correct, for one prompt."""
  prompt, _ = task.examples(1, seed=3)[0]
  answers = itertools.product(task.alphabet, repeat=task.answer_length)
  correct = sum(task.check(prompt, "".join(a)) for a in answers)
  assert correct / len(task.alphabet) ** task.answer_length == pytest.approx(task.chance, rel=1e-12)


def test_independent_chance():
  """Unique answers: 1. Permutations of n distinct items: n!/n^n. Dyck words of length 8:
  enumeration, and a Monte Carlo check of the product-of-marginals decoder."""
  for name in ("copy", "rev", "sort", "add"):
    assert tasks.TASKS[name].independent_chance == 1.0
  perm = tasks.TASKS["perm"]
  assert perm.independent_chance == pytest.approx(math.factorial(4) / 4 ** 4)
  dyck = tasks.TASKS["dyck"]
  answers = [a for _, a in dyck.examples(20_000, seed=0)]
  rng = np.random.default_rng(0)
  opens = np.mean([[c == "(" for c in a] for a in answers], axis=0)
  draws = rng.random((20_000, 8)) < opens
  rate = np.mean([tasks.balanced("".join("(" if o else ")" for o in row)) for row in draws])
  assert rate == pytest.approx(dyck.independent_chance, abs=0.015)
  assert dyck.independent_chance < 0.5 < 1.0 and dyck.chance == 14 / 256


def test_dyck16_independent_chance_matches_a_product_of_marginals_decoder():
  """The long suite's dyck16 baseline (enumerated over 2^16 strings) against Monte Carlo draws of
  each position from the marginals of uniformly drawn correct answers."""
  dyck = tasks.LONG_TASKS["dyck16"]
  answers = [a for _, a in dyck.examples(20_000, seed=0)]
  opens = np.mean([[c == "(" for c in a] for a in answers], axis=0)
  draws = np.random.default_rng(1).random((20_000, 16)) < opens
  rate = np.mean([tasks.balanced("".join("(" if o else ")" for o in row)) for row in draws])
  assert rate == pytest.approx(dyck.independent_chance, abs=0.012)


def test_corpus_lines_have_one_width_and_canvas_parts_rebuild_them(tmp_path):
  text = tasks.corpus(200, seed=0)
  lines = text.splitlines(keepends=True)
  assert len(lines) == 200 and all(len(l) == tasks.LINE_WIDTH for l in lines)
  assert {l.split(" ", 1)[0] for l in lines} == set(tasks.TASKS)
  for task in tasks.get():
    prompt, answer = task.examples(1, seed=0)[0]
    before, count, after = tasks.canvas_parts(task, prompt)
    assert before + answer + after == tasks.line(prompt, answer) and count == len(answer)
  path = tasks.write_corpus(tmp_path / "c.txt", 10, seed=1, names=["add", "dyck"])
  assert all(l.startswith(("add ", "dyck ")) for l in path.read_text().splitlines())
  with pytest.raises(UserError, match="unknown task"):
    tasks.get(["nope"])


def test_long_suite_lines_are_one_wider_width_and_its_baselines_are_exact():
  """The long suite's answers are 9-16 characters in lines of LONG_WIDTH; its chance levels
  follow from the answer formats (dyck16: Catalan(8) = 1430 of 2^16 strings), and mixing the
  suites' widths in one corpus is refused."""
  long = tasks.get(suite="long")
  assert {t.name for t in long} == {"copy16", "rev16", "sort16", "add8", "dyck16"}
  text = tasks.corpus(300, seed=0, suite="long")
  lines = text.splitlines(keepends=True)
  assert all(len(l) == tasks.LONG_WIDTH for l in lines)
  assert {l.split(" ", 1)[0] for l in lines} == {"copy", "rev", "sort", "add", "dyck"}
  for task in long:
    prompt, answer = task.examples(1, seed=0)[0]
    before, count, after = tasks.canvas_parts(task, prompt)
    assert before + answer + after == tasks.line(prompt, answer, tasks.LONG_WIDTH)
    assert count == task.answer_length >= 9
  by_name = tasks.LONG_TASKS
  assert by_name["copy16"].chance == pytest.approx(8.0 ** -16)
  assert by_name["add8"].examples(1, seed=0)[0][0].count("+") == 1
  assert by_name["dyck16"].chance == pytest.approx(1430 / 2 ** 16)
  assert 0 < by_name["dyck16"].independent_chance < tasks.TASKS["dyck"].independent_chance
  assert tasks.get(["add8"]) == [by_name["add8"]]  # names reach either suite
  with pytest.raises(UserError, match="share a line width"):
    tasks.corpus(10, seed=0, names=["add", "add8"])
  with pytest.raises(UserError, match="unknown task suite 'huge'; valid: short, long"):
    tasks.get(suite="huge")

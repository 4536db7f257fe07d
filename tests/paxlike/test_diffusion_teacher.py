"""paxlike.diffusion_teacher: a conditional masked-diffusion model's own answers, the
self-distilled student's corpus."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.build import build_model
from models.config import ModelConfig
from paxlike import diffusion_teacher, interchange, tasks, tokenizer
from paxlike.bench import diffusion_suite, harness
from paxlike.errors import UserError
from paxlike.workflows import write_config
from samplers import unmask
from tests.paxlike import cli
from tests.samplers import toy_denoiser as td


def _lines(count: int) -> list[str]:
  return [tasks.line(*t.examples(1, seed=i)[0]) for i, t in enumerate(tasks.get() * 3)][:count]


def test_split_lines_gives_the_stream_back():
  stream = tokenizer.encode("ab=c\nd=ef\n\nxyz").astype(np.int32)
  pieces = diffusion_teacher.split_lines(stream)
  assert [tokenizer.decode(p) for p in pieces] == ["ab=c\n", "d=ef\n", "\n", "xyz"]
  np.testing.assert_array_equal(np.concatenate(pieces), stream)


def test_answers_depend_on_their_own_line_alone_and_keep_the_prompts():
  model = build_model(ModelConfig(kind="mdlm", num_layers=1, d_model=32, num_heads=2,
                                  num_kv_heads=2, mlp_dim=64, max_len=48, response_after="="))
  params = model.init(jax.random.key(0))
  text = "".join(_lines(7)) + "no answer here\n"
  stream = tokenizer.encode(text).astype(np.int32)
  out, answered, kept = diffusion_teacher.answer_lines(model, params, stream, interchange.BYTES,
                                                       batch=3)  # 7 lines of 24: one padded batch
  assert answered + kept == 7 and len(out) == len(stream)
  for old, new in zip(diffusion_teacher.split_lines(stream), diffusion_teacher.split_lines(out)):
    prompt = tokenizer.decode(old).split("=")[0]
    assert tokenizer.decode(new).startswith(prompt) and len(new) == len(old)
    if "=" not in tokenizer.decode(old):
      np.testing.assert_array_equal(new, old)
      continue
    canvas = np.where(np.asarray(diffusion_teacher.conditioning.response_positions(
        jnp.asarray(old[None]), "=")), model.mask_id, old[None])
    alone = unmask.sample(model, params, jnp.asarray(canvas, jnp.int32), jax.random.key(9),
                          unmask.UnmaskConfig(k=1))  # greedy top-1, this line alone
    if np.array_equal(new, old) and not np.array_equal(np.asarray(alone.tokens)[0], old):
      continue  # kept its own answer: the teacher's was not clean text
    np.testing.assert_array_equal(np.asarray(alone.tokens)[0], new)


@pytest.mark.slow
def test_write_reanswers_training_lines_and_keeps_unclean_answers(tmp_path, monkeypatch):
  corpus = tasks.write_corpus(tmp_path / "tasks.txt", 400, seed=0)
  exp = diffusion_suite.experiment("teacher", "mdlm", corpus, steps=2)
  harness.trained(exp, tmp_path / "teacher")
  path, answered, kept = diffusion_teacher.write(tmp_path / "teacher", tmp_path / "out.txt",
                                                 lines=10, batch=4)
  assert answered + kept == 10
  source = corpus.read_text().splitlines(keepends=True)[:10]
  written = path.read_text().splitlines(keepends=True)
  assert [len(w) for w in written] == [len(s) for s in source]  # lines and windows stay aligned
  assert [w.split("=")[0] for w in written] == [s.split("=")[0] for s in source]
  result = cli.run(f"--workdir={tmp_path / 'teacher'}", f"--out={tmp_path / 'cli.txt'}",
                   "--lines=10", module="paxlike.diffusion_teacher")
  assert result.returncode == 0 and f"{answered} lines re-answered" in result.stdout, result.stderr
  assert (tmp_path / "cli.txt").read_text() == path.read_text()  # greedy: the same answers
  cli.assert_user_error(cli.run(f"--workdir={tmp_path / 'teacher'}", f"--out={tmp_path / 'e.txt'}",
                                "--lines=-2", module="paxlike.diffusion_teacher"), "lines")
  # a NUL, a newline or invalid UTF-8 in an answer: the line keeps its own answer
  def unclean(model, params, lines, *_):
    lines = lines.copy()
    lines[0, -3], lines[1, -3], lines[2, -3], lines[3, -3] = 0, ord("\n"), 0xFF, ord("z")
    return lines
  monkeypatch.setattr(diffusion_teacher, "relabel", unclean)
  path, answered, kept = diffusion_teacher.write(tmp_path / "teacher", tmp_path / "x.txt",
                                                 lines=4)
  written = path.read_text().splitlines(keepends=True)
  assert (answered, kept) == (1, 3) and written[:3] == source[:3]
  assert written[3] == source[3][:-3] + "z" + source[3][-2:]
  with pytest.raises(UserError, match="lines must be >= 0"):
    diffusion_teacher.write(tmp_path / "teacher", tmp_path / "y.txt", lines=-1)
  ar = dataclasses.replace(exp, name="ar", model=dataclasses.replace(
      exp.model, kind="llama", response_after=""))
  (tmp_path / "ar").mkdir()
  write_config(tmp_path / "ar", ar)  # the kind is checked before any checkpoint is read
  with pytest.raises(UserError, match="needs a conditional masked-diffusion teacher"):
    diffusion_teacher.write(tmp_path / "ar", tmp_path / "z.txt")
  with pytest.raises(UserError, match="needs a conditional masked-diffusion draft"):
    diffusion_teacher.write(tmp_path / "teacher", tmp_path / "z.txt", draft_workdir=tmp_path / "ar")
  other = dataclasses.replace(exp, name="other", model=dataclasses.replace(
      exp.model, vocab_size=300, mask_id=299))
  (tmp_path / "other").mkdir()
  write_config(tmp_path / "other", other)
  with pytest.raises(UserError, match="vocabulary 300"):
    diffusion_teacher.write(tmp_path / "teacher", tmp_path / "z.txt",
                            draft_workdir=tmp_path / "other")


@pytest.mark.slow
def test_second_round_anchors_answers_on_the_students_drafts(tmp_path):
  corpus = tasks.write_corpus(tmp_path / "tasks.txt", 400, seed=0)
  harness.trained(diffusion_suite.experiment("teacher", "mdlm", corpus, steps=2),
                  tmp_path / "teacher")
  harness.trained(diffusion_suite.experiment("student", "mdlm", corpus, steps=1,
                                             init_from=tmp_path / "teacher"), tmp_path / "student")
  result = cli.run(f"--workdir={tmp_path / 'teacher'}", f"--out={tmp_path / 'two.txt'}",
                   f"--draft_workdir={tmp_path / 'student'}", "--accept=0.5", "--lines=8",
                   module="paxlike.diffusion_teacher")
  assert result.returncode == 0 and "lines re-answered" in result.stdout, result.stderr
  source = corpus.read_text().splitlines(keepends=True)[:8]
  written = (tmp_path / "two.txt").read_text().splitlines(keepends=True)
  assert [(len(w), w.split("=")[0]) for w in written] == [(len(s), s.split("=")[0])
                                                          for s in source]
  cli.assert_user_error(cli.run(f"--workdir={tmp_path / 'teacher'}", f"--out={tmp_path / 'e.txt'}",
                                f"--draft_workdir={tmp_path / 'student'}", "--accept=0",
                                module="paxlike.diffusion_teacher"), "accept in (0, 1]")


def _anchored_by_hand(teacher, teacher_params, draft, draft_params, canvas, accept):
  """The definition of `anchored_greedy`, one row and one committed token at a time."""
  out = []
  for row in canvas:
    row = row.copy()
    logits = np.asarray(draft.denoise(draft_params, jnp.asarray(row[None])), np.float64)[0]
    logits[:, teacher.mask_id] = -np.inf
    proposal = logits.argmax(-1)
    while (row == teacher.mask_id).any():
      logits = np.asarray(teacher.denoise(teacher_params, jnp.asarray(row[None])), np.float64)[0]
      logits[:, teacher.mask_id] = -np.inf
      dist = np.exp(logits - logits.max(-1, keepdims=True))
      dist /= dist.sum(-1, keepdims=True)
      best = None
      for i in np.flatnonzero(row == teacher.mask_id):
        token = proposal[i] if dist[i, proposal[i]] >= accept else dist[i].argmax()
        if best is None or dist[i, token] > best[0] + 1e-6:
          best = (dist[i, token], i, token)
      row[best[1]] = best[2]
    out.append(row)
  return np.stack(out)


def test_anchored_greedy_keeps_draft_tokens_the_teacher_allows():
  teacher = td.TabularDenoiser(vocab=3, length=5)  # exact conditionals of random joints
  teacher_params = teacher.params(td.random_joint(0, 3, 5, scale=2.0))
  draft_params = teacher.params(td.random_joint(1, 3, 5, scale=2.0))
  m = teacher.mask_id
  canvas = np.array([[m] * 5, [0, m, m, m, m], [m, 2, m, m, 1], [1, m, m, m, 0]] * 2, np.int32)
  run = lambda accept: np.asarray(diffusion_teacher.anchored_greedy(
      teacher, teacher_params, teacher, draft_params, jnp.asarray(canvas), accept))
  draft = np.asarray(jnp.argmax(teacher.denoise(draft_params, jnp.asarray(canvas)), -1))
  masked = canvas == m
  np.testing.assert_array_equal(run(1e-30), np.where(masked, draft, canvas))  # every one kept
  greedy = np.asarray(unmask.sample(teacher, teacher_params, jnp.asarray(canvas),
                                    jax.random.key(0), unmask.UnmaskConfig(k=1)).tokens)
  np.testing.assert_array_equal(run(1.0), greedy)  # none kept: greedy top-1
  mixed = 0
  for accept in (0.2, 0.35, 0.5):
    out = run(accept)
    np.testing.assert_array_equal(out, _anchored_by_hand(teacher, teacher_params, teacher,
                                                         draft_params, canvas, accept))
    mixed += sum(not np.array_equal(o, d) and not np.array_equal(o, g)
                 for o, d, g in zip(out, np.where(masked, draft, canvas), greedy))
  assert mixed  # some rows are neither the draft nor greedy: both branches were taken

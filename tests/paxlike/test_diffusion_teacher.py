"""paxlike.diffusion_teacher: a conditional masked-diffusion model's own answers, the
self-distilled student's corpus."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.build import build_model
from models.config import DiffusionConfig, ModelConfig
from paxlike import diffusion_teacher, interchange, tasks, tokenizer
from paxlike.bench import diffusion_models, harness
from paxlike.errors import UserError
from paxlike.run import Run
from samplers import unmask
from tests.paxlike import cli


def _lines(count: int) -> list[str]:
  return [tasks.line(*t.examples(1, seed=i)[0]) for i, t in enumerate(tasks.get() * 3)][:count]


def test_split_lines_gives_the_stream_back():
  stream = tokenizer.encode("ab=c\nd=ef\n\nxyz").astype(np.int32)
  pieces = diffusion_teacher.split_lines(stream)
  assert [tokenizer.decode(p) for p in pieces] == ["ab=c\n", "d=ef\n", "\n", "xyz"]
  np.testing.assert_array_equal(np.concatenate(pieces), stream)


def test_answers_depend_on_their_own_line_alone_and_keep_the_prompts():
  model = build_model(ModelConfig(kind="mdlm", num_layers=1, d_model=32, num_heads=2,
                                  num_kv_heads=2, mlp_dim=64, max_len=48,
                                  diffusion=DiffusionConfig(response_after="=")))
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
  exp = diffusion_models.experiment("teacher", "mdlm", corpus, steps=2)
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
  def unclean(model, params, lines, batch, seed):
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
      exp.model, kind="llama", diffusion=DiffusionConfig()))
  (tmp_path / "ar").mkdir()
  Run(tmp_path / "ar").write_config(ar)  # the kind is checked before any checkpoint is read
  with pytest.raises(UserError, match="need a conditional masked-diffusion model"):
    diffusion_teacher.write(tmp_path / "ar", tmp_path / "z.txt")

"""paxlike.diffusion_teacher: a masked-diffusion model's own answers, the self-distilled student's
corpus."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.build import build_model
from models.config import ModelConfig
from paxlike import diffusion_teacher, tasks, tokenizer
from paxlike.bench import diffusion_suite, harness
from paxlike.errors import UserError
from samplers import unmask


def _windows(*texts: str) -> np.ndarray:
  return np.stack([tokenizer.encode(t) for t in texts]).astype(np.int32)


def test_regenerated_marks_the_responses_after_the_first_line():
  windows = _windows("add 1+2=3 \nadd 4+5=9 \n", "x=1\nab=cd\n=e\nabcdefghi")
  marked = diffusion_teacher.regenerated(windows, "=")
  text = lambda row, keep: "".join(c if k else "." for c, k in zip(tokenizer.decode(row), keep))
  assert text(windows[0], marked[0]) == "..........." + "........9 ."
  assert text(windows[1], marked[1]) == "...." + "...cd." + ".e." + "." * 9
  everything = diffusion_teacher.regenerated(windows, "")  # unconditional: all after line 1
  assert everything[0].tolist() == [False] * 11 + [True] * 11


def test_relabel_answers_each_window_by_greedy_top1_in_any_batch():
  model = build_model(ModelConfig(kind="mdlm", num_layers=1, d_model=32, num_heads=2,
                                  num_kv_heads=2, mlp_dim=64, max_len=48, response_after="="))
  params = model.init(jax.random.key(0))
  lines = [tasks.line(*t.examples(1, seed=i)[0]) for i, t in enumerate(tasks.get() * 2)][:10]
  windows = _windows(*(a + b for a, b in zip(lines[::2], lines[1::2])))
  answered = diffusion_teacher.relabel(model, params, windows, batch=2)  # 5 rows: one padded
  redo = diffusion_teacher.regenerated(windows, "=")
  np.testing.assert_array_equal(answered[~redo], windows[~redo])  # context and prompts kept
  assert not np.any(answered == model.mask_id)
  for row, window in zip(answered, windows):  # each row alone, greedy one token per call
    canvas = np.where(diffusion_teacher.regenerated(window[None], "="), model.mask_id,
                      window[None])
    alone = unmask.sample(model, params, jnp.asarray(canvas, jnp.int32), jax.random.key(5),
                          unmask.UnmaskConfig(k=1))
    np.testing.assert_array_equal(np.asarray(alone.tokens)[0], row)


@pytest.mark.slow
def test_write_relabels_training_windows_and_drops_unclean_ones(tmp_path, monkeypatch):
  corpus = tasks.write_corpus(tmp_path / "tasks.txt", 400, seed=0)
  exp = diffusion_suite.experiment("teacher", "mdlm", corpus, steps=2)
  harness.trained(exp, tmp_path / "teacher")
  path, written, dropped = diffusion_teacher.write(tmp_path / "teacher", tmp_path / "out.txt",
                                                   windows=6, batch=4)
  assert written + dropped == 6
  data = path.read_bytes()
  assert len(data) == written * exp.data.seq_len  # whole windows: the student's stay aligned
  source = corpus.read_bytes()
  first_lines = {source[i:i + tasks.LINE_WIDTH] for i in range(0, 12 * tasks.LINE_WIDTH,
                                                               2 * tasks.LINE_WIDTH)}
  for start in range(0, len(data), exp.data.seq_len):
    assert data[start:start + tasks.LINE_WIDTH] in first_lines
  # a NUL byte or invalid UTF-8 in an answer drops its window
  clean = _windows(tasks.line("copy ab=", "ab") * 2)
  nul = clean.copy()
  nul[0, -3] = 0
  bad = clean.copy()
  bad[0, -3] = 0xFF
  monkeypatch.setattr(diffusion_teacher, "relabel",
                      lambda *_: np.concatenate([clean, nul, bad]))
  path, written, dropped = diffusion_teacher.write(tmp_path / "teacher", tmp_path / "x.txt",
                                                   windows=3)
  assert (written, dropped) == (1, 2) and path.read_text() == tasks.line("copy ab=", "ab") * 2
  with pytest.raises(UserError, match="windows must be >= 0"):
    diffusion_teacher.write(tmp_path / "teacher", tmp_path / "y.txt", windows=-1)
  ar = dataclasses.replace(exp, model=dataclasses.replace(exp.model, kind="llama",
                                                          response_after=""))
  harness.trained(dataclasses.replace(ar, name="ar"), tmp_path / "ar")
  with pytest.raises(UserError, match="need a masked-diffusion model"):
    diffusion_teacher.write(tmp_path / "ar", tmp_path / "z.txt")

"""A diffusion model's own answers, for self-distillation into a decoder that needs fewer calls.

Unmasking every response position in one model call draws each position from its own marginal.
On prompts with many correct answers (any permutation, any balanced bracket string) the marginals
mix the answers, and their product is often none of them: the factorisation penalty
(`paxlike.tasks.independent_chance`). One token per call has no such penalty but costs a call per
token. Self-distillation removes the ambiguity instead of working around it: a student trained on
the teacher's *own* one-token-per-call greedy answers sees one answer per prompt, so its marginals
are sharp and one call reproduces what took the teacher one call per token (the idea of
certainty-forcing distillation, dParallel, Chen et al. 2025, and of self-distillation through
time, Deschenaux & Gulcehre 2024).

This module writes the student's corpus: the teacher's training split with the response of every
line (`model.diffusion.response_after`: the part after the separator) re-answered by the
teacher's greedy one-token-per-call unmasking, given that line alone. Given the line alone, not
the lines around it, so that an answer is a function of its prompt: re-answered inside its
training window, the same permutation prompt got different answers beside different neighbours
(21% of them on the task suite), and a one-call student cannot be sharp on targets that vary.
Everything else is kept byte for byte (a line keeps its own answer where the teacher's is not
clean text: a NUL, a newline, invalid UTF-8), so line lengths and window alignment do not change.
Fine-tune the student from the teacher on it:

  python -m paxlike.diffusion_teacher --workdir=runs/mdlm --out=runs/mdlm/self_answers.txt
  python -m paxlike.main --exp=... --workdir=runs/mdlm_student \
    --set data.path=runs/mdlm/self_answers.txt --set train.init_from=runs/mdlm

and then, for the fewest calls, once more on the same file from that student with
`--set model.diffusion.min_t=0.9 --set model.diffusion.min_t_rows=0.5` (half of the rows on
nearly fully masked answers, the state one-call decoding starts from, half on the partly masked
states of later calls; `paxlike.bench diffusion` runs that stage twice and measures the result).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from models import conditioning
from paxlike import atomic
from paxlike import config as config_lib
from paxlike import data as data_lib
from paxlike import interchange
from paxlike.errors import UserError, run_cli
from paxlike.run import Run
from paxlike.teacher_text import in_batches
from samplers import unmask

DENOISERS = ("mdlm", "learn2pd")  # kinds whose models `unmask.sample` decodes


def relabel(model, params, lines: np.ndarray, batch: int, seed: int = 0) -> np.ndarray:
  """lines [N, W] int32 (corpus lines of one length) -> [N, W] with each line's response
  positions re-answered by the model's greedy exact-order top-1 unmasking given that line alone,
  `batch` rows per compiled call."""
  redo = np.asarray(conditioning.response_positions(jnp.asarray(lines),
                                                    model.config.diffusion.response_after))
  canvas = np.where(redo, model.mask_id, lines).astype(np.int32)
  config = unmask.UnmaskConfig(k=1)
  return in_batches(canvas, batch, lambda padded, first: unmask.sample(
      model, params, jnp.asarray(padded), jax.random.fold_in(jax.random.key(seed), first),
      config).tokens)


def split_lines(stream: np.ndarray) -> list[np.ndarray]:
  """A token stream -> its lines, each ending with its newline (the rest after the last newline
  is a last piece of its own); concatenated they give the stream back."""
  ends = np.flatnonzero(stream == conditioning.NEWLINE_ID) + 1
  return [piece for piece in np.split(stream, ends) if len(piece)]


def answer_lines(model, params, stream: np.ndarray, codec: interchange.TextCodec, batch: int,
                 seed: int = 0) -> tuple[np.ndarray, int, int]:
  """(the stream with every line's response re-answered by `relabel`, lines re-answered, lines
  that kept their own answer because the teacher's was not clean text). Lines of equal length
  are decoded together (one compile per length); lines without a response, or longer than the
  model's max_len, are kept as they are."""
  lines = split_lines(stream)
  separator = ord(model.config.diffusion.response_after)
  by_length: dict[int, list[int]] = {}
  for i, line in enumerate(lines):
    if line[-1] == conditioning.NEWLINE_ID and separator in line[:-2].tolist() and (
        len(line) <= model.config.max_len):
      by_length.setdefault(len(line), []).append(i)
  answered = kept = 0
  for width, indices in by_length.items():
    new = relabel(model, params, np.stack([lines[i] for i in indices]), min(batch, len(indices)),
                  seed + width)
    for i, row in zip(indices, new):
      text = codec.decode(row)
      if "\x00" in text or "\n" in text[:-1] or not np.array_equal(codec.encode(text), row):
        kept += 1
      else:
        lines[i], answered = row, answered + 1
  return np.concatenate(lines), answered, kept


def write(workdir: str | Path, out: str | Path, lines: int = 0, batch: int = 256,
          seed: int = 0) -> tuple[Path, int, int]:
  """Writes the first `lines` lines (all when 0) of the training split of the conditional
  masked-diffusion model trained in `workdir` (its latest checkpoint), their responses
  re-answered by it (`answer_lines`), to `out`, atomically. Returns (path, lines re-answered,
  lines that kept their own answer)."""
  teacher = Run(workdir, log=lambda _: None)
  model_config = teacher.exp.model
  if model_config.kind not in DENOISERS or not model_config.diffusion.response_after:
    raise UserError(f"self-distillation answers need a conditional masked-diffusion model "
                    f"(model.kind one of {', '.join(DENOISERS)} with "
                    f"model.diffusion.response_after set); "
                    f"{str(workdir)!r} holds a {model_config.kind!r} model with response_after "
                    f"{model_config.diffusion.response_after!r}")
  if lines < 0 or batch < 1:
    raise UserError(f"lines must be >= 0 (0: all) and batch >= 1, got {lines} and {batch}")
  codec = interchange.text_codec(model_config)
  stream = data_lib.load_corpus(teacher.exp.data, codec).train
  if lines:
    ends = np.flatnonzero(stream == conditioning.NEWLINE_ID)
    stream = stream[:ends[lines - 1] + 1] if len(ends) >= lines else stream
  model, params, _ = teacher.restore(config_lib.MeshConfig())
  answered_stream, answered, kept = answer_lines(model, params, stream, codec, batch, seed)
  out = Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  atomic.write_text(out, codec.decode(answered_stream))
  return out, answered, kept


def main(argv: Sequence[str]) -> int:
  del argv
  from absl import flags
  f = flags.FLAGS

  def job() -> str:
    path, answered, kept = write(f.workdir, f.out, f.lines, f.batch, f.seed)
    return (f"wrote {path}: {answered} lines re-answered, {kept} kept their own answer (the "
            f"teacher's was not clean text)")
  return run_cli(job)


if __name__ == "__main__":
  from absl import app, flags
  flags.DEFINE_string("workdir", None, "The trained masked-diffusion model's run.", required=True)
  flags.DEFINE_string("out", None, "Text file to write.", required=True)
  flags.DEFINE_integer("lines", 0, "Lines of the training split to re-answer (0: all).")
  flags.DEFINE_integer("batch", 256, "Rows per compiled sampler call.")
  flags.DEFINE_integer("seed", 0, "Seed of the sampler (greedy: only ties).")
  app.run(main)

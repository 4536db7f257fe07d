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
line (`model.response_after`: the part after the separator) re-answered by the teacher's greedy
one-token-per-call unmasking, given that line alone. Given the line alone, not the lines around
it, so that an answer is a function of its prompt: re-answered inside its training window, the
same permutation prompt got different answers beside different neighbours (21% of them on the
task suite), and a one-call student cannot be sharp on targets that vary. Everything else is kept
byte for byte (a line keeps its own answer where the teacher's is not clean text: a NUL, a
newline, invalid UTF-8), so line lengths and window alignment do not change. Fine-tune the
student from the teacher on it:

  python -m paxlike.diffusion_teacher --workdir=runs/mdlm --out=runs/mdlm/self_answers.txt
  python -m paxlike.main --exp=... --workdir=runs/mdlm_student \
    --set data.path=runs/mdlm/self_answers.txt --set train.init_from=runs/mdlm
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from models import conditioning
from paxlike import atomic
from paxlike import config as config_lib
from paxlike import interchange
from paxlike.errors import UserError, run_cli
from paxlike.teacher_text import in_batches
from paxlike.train import Trainer
from samplers import unmask

DENOISERS = ("mdlm", "learn2pd")  # kinds whose models `unmask.sample` decodes


ACCEPT = 0.2  # a draft token stands where the teacher gives it at least this probability


@functools.partial(jax.jit, static_argnames=("model", "draft_model"))
def anchored_greedy(model, params, draft_model, draft_params, canvas: jax.Array,
                    accept: float = ACCEPT) -> jax.Array:
  """canvas [B, L] int32 -> [B, L] with every mask filled by the teacher (`model`) one token per
  call, most confident first like greedy top-1 unmasking, except that a position's candidate is
  the draft model's one-call argmax wherever the teacher, given what is committed so far, gives
  it probability >= `accept` (else the teacher's argmax).

  The answer is the teacher's (each token plausible to it given the ones before) and as near as
  it can be to what the draft already says in one call, so a student trained on it has less to
  learn than from the teacher's own arbitrary choice among equally good answers (which
  permutation, which bracket string).
  """
  mask = model.mask_id
  no_mask = lambda logits: logits.astype(jnp.float32).at[..., mask].set(-jnp.inf)
  draft = jnp.argmax(no_mask(draft_model.denoise(draft_params, canvas)), axis=-1)
  one = unmask.UnmaskConfig(k=1)

  def body(tokens):
    dist = jax.nn.softmax(no_mask(model.denoise(params, tokens)), axis=-1)
    draft_prob = jnp.take_along_axis(dist, draft[..., None], axis=-1)[..., 0]
    candidates = jnp.where(draft_prob >= accept, draft, jnp.argmax(dist, axis=-1))
    conf = jnp.take_along_axis(dist, candidates[..., None], axis=-1)[..., 0]
    eligible = tokens == mask
    return jnp.where(unmask.commit_mask(one, conf, eligible), candidates, tokens)

  return jax.lax.while_loop(lambda t: jnp.any(t == mask), body, canvas.astype(jnp.int32))


def relabel(model, params, lines: np.ndarray, batch: int, seed: int = 0,
            draft: tuple[Any, Any] | None = None, accept: float = ACCEPT) -> np.ndarray:
  """lines [N, W] int32 (corpus lines of one length) -> [N, W] with each line's response
  positions re-answered by the model given that line alone, `batch` rows per compiled call: its
  greedy exact-order top-1 unmasking, or with `draft` = (model, params) of a student its
  `anchored_greedy` answer near the student's one-call draft."""
  redo = np.asarray(conditioning.response_positions(jnp.asarray(lines),
                                                    model.config.response_after))
  canvas = np.where(redo, model.mask_id, lines).astype(np.int32)
  if draft is not None:
    return in_batches(canvas, batch, lambda padded, _: anchored_greedy(
        model, params, draft[0], draft[1], jnp.asarray(padded), accept))
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
                 seed: int = 0, draft: tuple[Any, Any] | None = None,
                 accept: float = ACCEPT) -> tuple[np.ndarray, int, int]:
  """(the stream with every line's response re-answered by `relabel`, lines re-answered, lines
  that kept their own answer because the teacher's was not clean text). Lines of equal length
  are decoded together (one compile per length); lines without a response, or longer than the
  model's max_len, are kept as they are."""
  lines = split_lines(stream)
  separator = ord(model.config.response_after)
  by_length: dict[int, list[int]] = {}
  for i, line in enumerate(lines):
    if line[-1] == conditioning.NEWLINE_ID and separator in line[:-2].tolist() and (
        len(line) <= model.config.max_len):
      by_length.setdefault(len(line), []).append(i)
  answered = kept = 0
  for width, indices in by_length.items():
    new = relabel(model, params, np.stack([lines[i] for i in indices]), min(batch, len(indices)),
                  seed + width, draft, accept)
    for i, row in zip(indices, new):
      text = codec.decode(row)
      if "\x00" in text or "\n" in text[:-1] or not np.array_equal(codec.encode(text), row):
        kept += 1
      else:
        lines[i], answered = row, answered + 1
  return np.concatenate(lines), answered, kept


def _denoiser(workdir: str | Path, role: str) -> Trainer:
  """The trainer of the conditional masked-diffusion run in `workdir`, or a clear error."""
  trainer = Trainer.from_workdir(workdir, config_lib.MeshConfig(), log=lambda _: None)
  model_config = trainer.exp.model
  if model_config.kind not in DENOISERS or not model_config.response_after:
    raise UserError(f"self-distillation needs a conditional masked-diffusion {role} (model.kind "
                    f"one of {', '.join(DENOISERS)} with model.response_after set); "
                    f"{str(workdir)!r} holds a {model_config.kind!r} model with response_after "
                    f"{model_config.response_after!r}")
  return trainer


def write(workdir: str | Path, out: str | Path, lines: int = 0, batch: int = 256,
          seed: int = 0, draft_workdir: str | Path | None = None,
          accept: float = ACCEPT) -> tuple[Path, int, int]:
  """Writes the first `lines` lines (all when 0) of the training split of the conditional
  masked-diffusion model trained in `workdir` (its latest checkpoint), their responses
  re-answered by it (`answer_lines`), to `out`, atomically. With `draft_workdir` (a student
  fine-tuned from it, same vocabulary) each answer is the teacher's anchored on the student's
  one-call draft (`anchored_greedy`, draft tokens kept at teacher probability >= `accept`): the
  corpus of a second round of distillation. Returns (path, lines re-answered, lines that kept
  their own answer)."""
  trainer = _denoiser(workdir, "teacher")
  if lines < 0 or batch < 1 or not 0 < accept <= 1:
    raise UserError(f"lines must be >= 0 (0: all), batch >= 1 and accept in (0, 1], got "
                    f"{lines}, {batch} and {accept}")
  draft = None
  if draft_workdir:
    student = _denoiser(draft_workdir, "draft")
    if (student.model.vocab_size, student.model.mask_id) != (trainer.model.vocab_size,
                                                             trainer.model.mask_id):
      raise UserError(f"the draft in {str(draft_workdir)!r} has vocabulary "
                      f"{student.model.vocab_size} (mask {student.model.mask_id}), the teacher "
                      f"{trainer.model.vocab_size} (mask {trainer.model.mask_id}); use a student "
                      f"fine-tuned from the teacher")
    draft = (student.model, student.restore_params()[0])
  stream = trainer.corpus.train
  if lines:
    ends = np.flatnonzero(stream == conditioning.NEWLINE_ID)
    stream = stream[:ends[lines - 1] + 1] if len(ends) >= lines else stream
  params, _ = trainer.restore_params()
  codec = interchange.text_codec(trainer.exp.model)
  answered_stream, answered, kept = answer_lines(trainer.model, params, stream, codec, batch, seed,
                                                 draft, accept)
  out = Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  atomic.write_text(out, codec.decode(answered_stream))
  return out, answered, kept


def main(argv: Sequence[str]) -> int:
  del argv
  from absl import flags
  f = flags.FLAGS

  def job() -> str:
    path, answered, kept = write(f.workdir, f.out, f.lines, f.batch, f.seed, f.draft_workdir,
                                 f.accept)
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
  flags.DEFINE_string("draft_workdir", None, "A student fine-tuned from the teacher: anchor each "
                      "answer on its one-call draft (a second round of distillation).")
  flags.DEFINE_float("accept", ACCEPT, "Keep a draft token where the teacher gives it at least "
                     "this probability.")
  app.run(main)

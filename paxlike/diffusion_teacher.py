"""A diffusion model's own answers, for self-distillation into a one-call decoder.

Unmasking every response position in one model call draws each position from its own marginal.
On prompts with many correct answers (any permutation, any balanced bracket string) the marginals
mix the answers, and their product is often none of them: the factorisation penalty
(`paxlike.tasks.independent_chance`). One token per call has no such penalty but costs a call per
token. Self-distillation removes the ambiguity instead of working around it: a student trained on
the teacher's *own* one-token-per-call greedy answers sees one answer per prompt, so its marginals
are sharp and one call reproduces what took the teacher one call per token (the idea of
certainty-forcing distillation, dParallel, Chen et al. 2025, and of self-distillation through
time, Deschenaux & Gulcehre 2024).

This module writes the student's corpus: the teacher's training windows (`data.seq_len` tokens,
the windows its trainer reads), each with its generated positions on every line after its first
re-answered by the teacher's greedy top-1 unmasking given the rest of the window. The first line
keeps the corpus's own text: it is the context (e.g. a solved example) the student will be given.
Generated positions are the response positions of a conditional model (`model.response_after`),
otherwise every position. Windows whose answers are not clean text (a NUL byte, invalid UTF-8)
are dropped whole, so the student's windows stay aligned with lines. Fine-tune the student from
the teacher on it:

  python -m paxlike.diffusion_teacher --workdir=runs/mdlm --out=runs/mdlm/self_answers.txt
  python -m paxlike.main --exp=... --workdir=runs/mdlm_student \
    --set data.path=runs/mdlm/self_answers.txt --set train.init_from=runs/mdlm
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
from paxlike import interchange
from paxlike.errors import UserError
from paxlike.train import Trainer
from samplers import unmask

DENOISERS = ("mdlm", "learn2pd")  # kinds whose models `unmask.sample` decodes


def regenerated(windows: np.ndarray, separator: str) -> np.ndarray:
  """windows [N, T] int32 -> [N, T] bool: the generated positions (response positions, or all
  when `separator` is "") that lie after each window's first newline."""
  tokens = jnp.asarray(windows)
  newline = tokens == conditioning.NEWLINE_ID
  after_first_line = jnp.cumsum(newline, axis=1) - newline >= 1  # newlines strictly before
  return np.asarray(conditioning.noisable(tokens, separator) & after_first_line)


def relabel(model, params, windows: np.ndarray, batch: int, seed: int = 0) -> np.ndarray:
  """windows [N, T] int32 -> [N, T] int32 with the `regenerated` positions re-answered by the
  model's greedy one-token-per-call unmasking (exact-order top-1), `batch` rows per compiled
  call."""
  redo = regenerated(windows, model.config.response_after)
  canvas = np.where(redo, model.mask_id, windows).astype(np.int32)
  config = unmask.UnmaskConfig(k=1)
  out = []
  for first in range(0, len(canvas), batch):
    chunk = canvas[first:first + batch]
    padded = np.concatenate([chunk, np.repeat(chunk[:1], batch - len(chunk), axis=0)])  # one shape
    key = jax.random.fold_in(jax.random.key(seed), first)
    tokens = unmask.sample(model, params, jnp.asarray(padded), key, config).tokens
    out.append(np.asarray(tokens)[:len(chunk)])
  return np.concatenate(out)


def write(workdir: str | Path, out: str | Path, windows: int = 0, batch: int = 256,
          seed: int = 0) -> tuple[Path, int, int]:
  """Writes the relabelled training windows of the denoiser trained in `workdir` (its latest
  checkpoint; the first `windows` of its training split, all when 0) to `out`, atomically.
  Returns (path, windows written, windows dropped as unclean text)."""
  trainer = Trainer.from_workdir(workdir, config_lib.MeshConfig(), log=lambda _: None)
  if trainer.exp.model.kind not in DENOISERS:
    raise UserError(f"self-distillation answers need a masked-diffusion model (model.kind one of "
                    f"{', '.join(DENOISERS)}); {str(workdir)!r} holds a "
                    f"{trainer.exp.model.kind!r} model")
  if windows < 0 or batch < 1:
    raise UserError(f"windows must be >= 0 (0: all) and batch >= 1, got {windows} and {batch}")
  seq_len = trainer.exp.data.seq_len
  stream = trainer.corpus.train
  available = len(stream) // seq_len
  count = min(windows or available, available)
  rows = stream[:count * seq_len].reshape(count, seq_len).astype(np.int32)
  params, _ = trainer.restore_params()
  answered = relabel(trainer.model, params, rows, min(batch, count), seed)
  codec = interchange.text_codec(trainer.exp.model)
  texts = [codec.decode(row) for row in answered]
  clean = [t for t, row in zip(texts, answered)
           if "\x00" not in t and np.array_equal(codec.encode(t), row)]
  out = Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  atomic.write_text(out, "".join(clean))
  return out, len(clean), count - len(clean)


def main(argv: Sequence[str]) -> int:
  del argv
  from absl import flags
  f = flags.FLAGS
  try:
    path, written, dropped = write(f.workdir, f.out, f.windows, f.batch, f.seed)
  except UserError as e:
    print(f"error: {e}", flush=True)
    return 2
  print(f"wrote {path}: {written} windows ({dropped} dropped as unclean text)")
  return 0


if __name__ == "__main__":
  from absl import app, flags
  flags.DEFINE_string("workdir", None, "The trained masked-diffusion model's run.", required=True)
  flags.DEFINE_string("out", None, "Text file to write.", required=True)
  flags.DEFINE_integer("windows", 0, "Training windows to relabel (0: all).")
  flags.DEFINE_integer("batch", 256, "Rows per compiled sampler call.")
  flags.DEFINE_integer("seed", 0, "Seed of the sampler (greedy: only ties).")
  app.run(main)

"""Text corpora to packed, fixed-length token sequences through a checkpointable Grain pipeline.

The corpus (files -> one byte-token stream per split, documents separated by eos) is cut into
windows of `seq_len + 1` tokens that share one token with the next (inputs and shifted targets). Training windows are shuffled per epoch under a
seed, repeated forever and batched by Grain; the iterator's state (the next index) is saved with
the model so a resumed run sees exactly the batches an uninterrupted one would. No prefetch
threads are used, so the saved state never runs ahead of the batches consumed.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import sys
import sysconfig
import zlib
from pathlib import Path

import grain
import numpy as np

from paxlike import interchange
from paxlike.config import DataConfig
from paxlike.errors import UserError

_EXCLUDED_STDLIB_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


@dataclasses.dataclass(frozen=True)
class Corpus:
  """Token streams of the train and held-out splits (int32, eos-separated documents)."""

  train: np.ndarray
  held_out: np.ndarray
  description: str


def default_corpus_files() -> list[Path]:
  """The running Python's standard-library `.py` sources (no tests, no site-packages), sorted."""
  root = Path(sysconfig.get_paths()["stdlib"])
  files = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDED_STDLIB_DIRS)
    files.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
  return files


def resolve_files(path: str) -> list[Path]:
  """Files named by a file path, a directory (all files below it) or a glob; sorted."""
  expanded = os.path.expanduser(path)
  if os.path.isdir(expanded):
    matches = [str(p) for p in Path(expanded).rglob("*") if p.is_file()]
  else:
    matches = [m for m in glob.glob(expanded, recursive=True) if os.path.isfile(m)]
  if not matches:
    raise UserError(f"data.path={path!r} matches no file; give a text file, a directory or a glob")
  return [Path(m) for m in sorted(matches)]


def _read_text(file: Path, strict: bool) -> str | None:
  """The file's text; a binary or non-UTF-8 file raises UserError (or returns None if not strict)."""
  raw = file.read_bytes()
  problem = None
  if b"\x00" in raw:
    problem = "is binary (contains NUL bytes)"
  else:
    try:
      return raw.decode("utf-8")
    except UnicodeDecodeError as e:
      problem = f"is not UTF-8 text (invalid byte at offset {e.start})"
  if strict:
    raise UserError(f"data file {str(file)!r} {problem}; data.path must name UTF-8 text files")
  return None


def _is_held_out(file: Path, root: Path, fraction: float) -> bool:
  """Deterministic split by a hash of the path relative to the corpus root."""
  key = str(file.relative_to(root) if file.is_relative_to(root) else file)
  return zlib.crc32(key.encode()) % 10_000 < fraction * 10_000


def _stream(texts: list[str], codec: interchange.TextCodec) -> np.ndarray:
  if not texts:
    return np.zeros([0], np.int32)
  return np.concatenate([np.append(codec.encode(t), codec.eos_id).astype(np.int32)
                         for t in texts])


def load_corpus(cfg: DataConfig, codec: interchange.TextCodec = interchange.BYTES) -> Corpus:
  """Reads and splits the corpus named by `cfg.path` (or the default corpus), tokenized by
  `codec` (the byte tokenizer, or an imported model's tokenizer.json)."""
  if cfg.path:
    files = resolve_files(cfg.path)
    root = Path(os.path.commonpath([str(f.parent) for f in files]))
    texts = {f: _read_text(f, strict=True) for f in files}
    description = cfg.path
  else:
    files = default_corpus_files()
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = {f: t for f in files if (t := _read_text(f, strict=False)) is not None}
    description = f"Python {sysconfig.get_python_version()} standard library ({len(texts)} files)"
  if sum(len(t) for t in texts.values()) == 0:
    raise UserError(f"the corpus {description!r} is empty: its files contain no text")
  held = [t for f, t in texts.items() if _is_held_out(f, root, cfg.eval_fraction)]
  train = [t for f, t in texts.items() if not _is_held_out(f, root, cfg.eval_fraction)]
  train_stream, held_stream = _stream(train, codec), _stream(held, codec)
  min_len = 2 * (cfg.seq_len + 1)
  if len(held_stream) < cfg.seq_len + 1 or len(train_stream) < min_len:
    # Too few files to split by file (e.g. a single file): hold out the tail of the stream.
    stream = _stream(list(texts.values()), codec)
    cut = int(len(stream) * (1.0 - cfg.eval_fraction))
    train_stream, held_stream = stream[:cut], stream[cut:]
  if len(train_stream) < min_len or len(held_stream) < cfg.seq_len + 1:
    raise UserError(
        f"the corpus {description!r} has {len(train_stream) + len(held_stream)} tokens: too small "
        f"for data.seq_len={cfg.seq_len} (needs at least {min_len + cfg.seq_len + 1})")
  return Corpus(train=train_stream, held_out=held_stream, description=description)


class Windows:
  """Random-access view of a token stream as windows of `length` tokens.

  Consecutive windows overlap by one token so that window i gives inputs and targets for the
  positions [i * (length - 1), (i + 1) * (length - 1)).
  """

  def __init__(self, tokens: np.ndarray, length: int):
    self._tokens = tokens
    self._length = length

  def __len__(self) -> int:
    return (len(self._tokens) - 1) // (self._length - 1)

  def __getitem__(self, index: int) -> np.ndarray:
    start = index * (self._length - 1)
    return self._tokens[start:start + self._length]


def train_dataset(tokens: np.ndarray, seq_len: int, global_batch: int, seed: int,
                  process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
  """Batches [global_batch / process_count, seq_len + 1] int32 of this process's rows.

  The global order (windows shuffled per epoch under `seed`, repeated forever, cut into global
  batches) does not depend on the process count; process p reads only rows
  [p * local, (p + 1) * local) of each global batch. So a run on several processes sees exactly the
  batches of a single-process run, and each process touches only its own share of the data.
  """
  if global_batch % process_count:
    raise UserError(
        f"train.batch_size={global_batch} is not divisible by the process count {process_count}")
  local = global_batch // process_count
  shuffled = grain.MapDataset.source(Windows(tokens, seq_len + 1)).shuffle(seed=seed).repeat(None)
  offset = process_index * local

  def window(j: int) -> np.ndarray:  # this process's j-th row: row j % local of global batch j // local
    return shuffled[(j // local) * global_batch + offset + j % local]

  return grain.MapDataset.range(sys.maxsize).map(window).batch(local, drop_remainder=True)


def train_iterator(dataset: grain.MapDataset) -> grain.DatasetIterator:
  """A checkpointable iterator without prefetch threads (its state never runs ahead)."""
  return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))


def eval_batches(tokens: np.ndarray, seq_len: int, batch_size: int,
                 num_batches: int) -> list[np.ndarray]:
  """Fixed held-out batches [batch_size, seq_len + 1], windows evenly spread over the split."""
  windows = Windows(tokens, seq_len + 1)
  count = min(len(windows), batch_size * num_batches)
  count -= count % batch_size
  if count == 0:
    count = min(len(windows), batch_size)
    picks = [i % len(windows) for i in range(batch_size)]
  else:
    picks = np.linspace(0, len(windows) - 1, count).astype(int).tolist()
  stacked = np.stack([windows[i] for i in picks])
  return [stacked[i:i + batch_size] for i in range(0, len(stacked), batch_size)]

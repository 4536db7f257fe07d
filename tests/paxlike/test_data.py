"""Tokenizer, corpus loading and splits, the Grain pipeline and its checkpointable state."""

import numpy as np
import pytest

from paxlike import data, tokenizer
from paxlike.config import DataConfig
from paxlike.errors import UserError
from tests.paxlike.cli import SHAKESPEARE


def test_tokenizer_round_trips_utf8_and_drops_specials():
  text = "naïve café — 日本語\n"
  ids = tokenizer.encode(text, bos=True, eos=True)
  assert ids[0] == tokenizer.BOS_ID and ids[-1] == tokenizer.EOS_ID
  assert ids.dtype == np.int32 and ids.max() < tokenizer.VOCAB_SIZE
  assert tokenizer.decode(ids) == text
  assert len(set(tokenizer.SPECIAL_IDS.values())) == 4


def test_default_corpus_split_is_deterministic_and_disjoint():
  files = data.default_corpus_files()
  assert len(files) > 100 and all(f.suffix == ".py" for f in files)
  assert not any("site-packages" in f.parts for f in files)
  a = data.load_corpus(DataConfig(seq_len=64))
  b = data.load_corpus(DataConfig(seq_len=64))
  np.testing.assert_array_equal(a.train, b.train)
  np.testing.assert_array_equal(a.held_out, b.held_out)
  assert 0.01 < len(a.held_out) / (len(a.train) + len(a.held_out)) < 0.2


def test_single_file_holds_out_its_tail():
  corpus = data.load_corpus(DataConfig(path=str(SHAKESPEARE), seq_len=64, eval_fraction=0.1))
  stream = tokenizer.encode(SHAKESPEARE.read_text(), eos=True)
  np.testing.assert_array_equal(np.concatenate([corpus.train, corpus.held_out]), stream)
  assert abs(len(corpus.held_out) / len(stream) - 0.1) < 0.01


def test_glob_and_directory_paths(tmp_path):
  for i in range(30):
    (tmp_path / f"doc{i}.txt").write_text(f"document number {i} " * 20)
  by_glob = data.load_corpus(DataConfig(path=str(tmp_path / "*.txt"), seq_len=16))
  by_dir = data.load_corpus(DataConfig(path=str(tmp_path), seq_len=16))
  np.testing.assert_array_equal(by_glob.train, by_dir.train)


def test_missing_path_is_named(tmp_path):
  with pytest.raises(UserError, match=r"data.path='.*nothing\*.txt' matches no file"):
    data.load_corpus(DataConfig(path=str(tmp_path / "nothing*.txt")))


def test_empty_corpus(tmp_path):
  (tmp_path / "empty.txt").write_text("")
  with pytest.raises(UserError, match="is empty"):
    data.load_corpus(DataConfig(path=str(tmp_path / "empty.txt")))


def test_binary_and_non_utf8_files_are_named(tmp_path):
  (tmp_path / "blob.bin").write_bytes(b"abc\x00\x01\x02")
  with pytest.raises(UserError, match=r"blob.bin' is binary"):
    data.load_corpus(DataConfig(path=str(tmp_path / "blob.bin")))
  (tmp_path / "latin.txt").write_bytes("café".encode("latin-1"))
  with pytest.raises(UserError, match=r"latin.txt' is not UTF-8"):
    data.load_corpus(DataConfig(path=str(tmp_path / "latin.txt")))


def test_windows_pack_the_stream_with_shifted_targets():
  stream = np.arange(100, dtype=np.int32)
  windows = data.Windows(stream, 11)
  assert len(windows) == 9
  np.testing.assert_array_equal(windows[1], np.arange(10, 21))
  batches = data.eval_batches(stream, 10, 2, 2)
  assert len(batches) == 2 and batches[0].shape == (2, 11)


def test_iterator_is_deterministic_and_resumes_from_its_state():
  stream = np.arange(5000, dtype=np.int32)
  make = lambda: data.train_iterator(data.train_dataset(stream, 16, 4, seed=3))
  it = make()
  first = [next(it) for _ in range(7)]
  state = it.get_state()
  rest = [next(it) for _ in range(90)]  # crosses an epoch boundary (78 windows / 4 per batch)
  again = make()
  np.testing.assert_array_equal(np.stack(first), np.stack([next(again) for _ in range(7)]))
  resumed = make()
  resumed.set_state(state)
  np.testing.assert_array_equal(np.stack(rest), np.stack([next(resumed) for _ in range(90)]))


def test_processes_read_their_rows_of_the_same_global_batches():
  stream = np.arange(3000, dtype=np.int32)
  single = data.train_iterator(data.train_dataset(stream, 16, 8, 0))
  shares = [data.train_iterator(data.train_dataset(stream, 16, 8, 0, p, 2)) for p in (0, 1)]
  for _ in range(30):  # crosses an epoch boundary
    together = np.concatenate([next(shares[0]), next(shares[1])])
    assert together.shape == (8, 17)
    np.testing.assert_array_equal(together, next(single))

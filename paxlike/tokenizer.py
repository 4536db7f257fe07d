"""Byte-level tokenizer: ids 0..255 are bytes, followed by a few special ids.

No vocabulary file, no download: any UTF-8 text round-trips exactly.
"""

from __future__ import annotations

import numpy as np

PAD_ID = 256
BOS_ID = 257
EOS_ID = 258
MASK_ID = 259
VOCAB_SIZE = 260
SPECIAL_IDS = {"pad": PAD_ID, "bos": BOS_ID, "eos": EOS_ID, "mask": MASK_ID}


def encode(text: str, bos: bool = False, eos: bool = False) -> np.ndarray:
  """UTF-8 bytes of `text` as int32 ids, optionally framed by bos/eos. Returns [N] int32."""
  ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)
  parts = ([np.array([BOS_ID], np.int32)] if bos else []) + [ids] + (
      [np.array([EOS_ID], np.int32)] if eos else [])
  return np.concatenate(parts)


def decode(ids) -> str:
  """Text of the byte ids in `ids`; special ids are dropped, invalid UTF-8 is replaced."""
  array = np.asarray(ids).reshape(-1)
  return bytes(array[array < 256].astype(np.uint8).tolist()).decode("utf-8", errors="replace")

"""Tokenizers. The byte-level one needs no files and serves the built-in demo."""

from __future__ import annotations

import numpy as np


class ByteTokenizer:
  """UTF-8 bytes as tokens 0..255, plus BOS (256), EOS (257) and PAD (258).

  Like Llama-2's tokenizer, `encode` prepends BOS and, on request, appends EOS.
  """

  bos_id = 256
  eos_id = 257
  pad_id = 258
  vocab_size = 259

  def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> np.ndarray:
    """`text` -> int32 token ids `[n]`."""
    ids = np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)
    parts = ([[self.bos_id]] if add_bos else []) + [ids] + ([[self.eos_id]] if add_eos else [])
    return np.concatenate([np.asarray(p, np.int32) for p in parts])

  def decode(self, ids) -> str:
    """Token ids -> text; special tokens are dropped, invalid UTF-8 replaced."""
    data = bytes(int(i) for i in np.asarray(ids).ravel() if 0 <= int(i) < 256)
    return data.decode("utf-8", errors="replace")

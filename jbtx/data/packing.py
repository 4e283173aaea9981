"""Packing variable-length documents into fixed-length rows.

Documents are concatenated in order and cut into rows of `seq_len` tokens; a document
that does not fit continues on the next row. Each row carries `segment_ids` (1, 2, …
per document piece in the row, 0 for padding) and `positions` (restarting at every
document start), so attention never crosses documents.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

Row = dict[str, np.ndarray]


def pack(documents: Iterable[np.ndarray], seq_len: int, pad_id: int) -> Iterator[Row]:
  """Yields rows `{"tokens", "segment_ids", "positions"}`, each int32 `[seq_len]`.

  Every token of every document appears exactly once; the last row is padded.
  """
  tokens = np.full(seq_len, pad_id, np.int32)
  segments = np.zeros(seq_len, np.int32)
  positions = np.zeros(seq_len, np.int32)
  fill = segment = 0
  for doc in documents:
    offset = 0  # Position of the next token within its document.
    while offset < len(doc):
      if fill == seq_len:
        yield {"tokens": tokens, "segment_ids": segments, "positions": positions}
        tokens = np.full(seq_len, pad_id, np.int32)
        segments = np.zeros(seq_len, np.int32)
        positions = np.zeros(seq_len, np.int32)
        fill = segment = 0
      take = min(seq_len - fill, len(doc) - offset)
      segment += 1
      tokens[fill:fill + take] = doc[offset:offset + take]
      segments[fill:fill + take] = segment
      positions[fill:fill + take] = np.arange(offset, offset + take)
      fill += take
      offset += take
  if fill:
    yield {"tokens": tokens, "segment_ids": segments, "positions": positions}


def batches(rows: Iterable[Row], batch_size: int) -> Iterator[Row]:
  """Stacks consecutive rows into batches `[batch_size, seq_len]`; drops a partial tail."""
  buffer: list[Row] = []
  for row in rows:
    buffer.append(row)
    if len(buffer) == batch_size:
      yield {k: np.stack([r[k] for r in buffer]) for k in buffer[0]}
      buffer = []

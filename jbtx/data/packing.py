"""Packing variable-length documents into fixed-length rows.

Documents are concatenated in order and cut into rows of `seq_len` tokens; a document
that does not fit continues on the next row. Each row carries `segment_ids` (1, 2, …
per document piece in the row, 0 for padding) and `positions`, so attention never
crosses documents. `fill_row` restarts positions at 0 for every piece, since a
continued piece cannot attend to its earlier part anyway and positions then stay
below `seq_len`; it is resumable from a cursor `(document, offset)`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Row = dict[str, np.ndarray]


Cursor = tuple[int, int]  # (document number, token offset within that document)


def fill_row(cursor: Cursor, document: Callable[[int], np.ndarray | None], seq_len: int,
             pad_id: int) -> tuple[Row, Cursor]:
  """Packs one row starting at `cursor`; returns it and the cursor after it.

  Args:
    cursor: the first token to pack: document number and offset into its tokens.
    document: document number -> its int32 tokens `[n]`, or None past the last one
      (the row is then padded; an infinite stream never returns None).
    seq_len: row length.
    pad_id: token id of padding (segment id 0).

  Returns:
    `{"tokens", "segment_ids", "positions"}`, each int32 `[seq_len]`, and the new cursor.
  """
  tokens = np.full(seq_len, pad_id, np.int32)
  segments = np.zeros(seq_len, np.int32)
  positions = np.zeros(seq_len, np.int32)
  number, offset = cursor
  fill = segment = 0
  while fill < seq_len:
    doc = document(number)
    if doc is None:
      break
    take = min(seq_len - fill, len(doc) - offset)
    if take > 0:
      segment += 1
      tokens[fill:fill + take] = doc[offset:offset + take]
      segments[fill:fill + take] = segment
      positions[fill:fill + take] = np.arange(take)
      fill += take
      offset += take
    if offset >= len(doc):
      number, offset = number + 1, 0
  return {"tokens": tokens, "segment_ids": segments, "positions": positions}, (number, offset)


def stack(rows: list[Row]) -> Row:
  """Rows `[seq_len]` -> a batch `[len(rows), seq_len]` per key."""
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

"""Packing: every token exactly once per epoch, no attention across documents, positions
restarting per document piece."""

import collections

import numpy as np

from jbtx.data import loader, packing
from jbtx.data.mixture import ShuffledOrder
from tests.data_fixtures import BOS, EOS, files_config, lane_documents, take, texts


def test_fill_row_splits_documents_across_rows_and_resumes_from_the_cursor():
  docs = [np.arange(1, 6), np.arange(10, 13), np.arange(20, 29)]
  document = lambda k: docs[k] if k < len(docs) else None
  row, cursor = packing.fill_row((0, 0), document, 7, pad_id=-1)
  np.testing.assert_array_equal(row["tokens"], [1, 2, 3, 4, 5, 10, 11])
  np.testing.assert_array_equal(row["segment_ids"], [1, 1, 1, 1, 1, 2, 2])
  np.testing.assert_array_equal(row["positions"], [0, 1, 2, 3, 4, 0, 1])
  assert cursor == (1, 2)
  row, cursor = packing.fill_row(cursor, document, 7, pad_id=-1)
  np.testing.assert_array_equal(row["tokens"], [12, 20, 21, 22, 23, 24, 25])
  np.testing.assert_array_equal(row["segment_ids"], [1, 2, 2, 2, 2, 2, 2])
  row, cursor = packing.fill_row(cursor, document, 7, pad_id=-1)
  np.testing.assert_array_equal(row["tokens"], [26, 27, 28, -1, -1, -1, -1])
  np.testing.assert_array_equal(row["segment_ids"], [1, 1, 1, 0, 0, 0, 0])
  assert cursor == (3, 0) and document(cursor[0]) is None


def _single_domain(tmp_path, n_docs=37, batch_size=4, seq_len=16):
  docs = texts("d", n_docs)
  config = files_config(tmp_path, {"only": (docs, 1.0)}, batch_size=batch_size,
                        seq_len=seq_len)
  return docs, config


def test_every_token_appears_exactly_once_per_epoch(tmp_path):
  docs, config = _single_domain(tmp_path)
  tokenizer = loader.make_tokenizer(config)
  batches = take(loader.train_iterator(config, seed=3), 60)
  order = ShuffledOrder(len(docs), seed=3, stream=0)
  first_epoch = []
  for lane in range(config.batch_size):
    packed = lane_documents(batches, lane)
    slots = [lane + k * config.batch_size for k in range(len(packed))]
    assert slots[-2] >= 2 * len(docs)  # The lane got well into the third epoch.
    for slot, doc in zip(slots[:-1], packed[:-1], strict=True):  # The last may be cut.
      np.testing.assert_array_equal(doc, tokenizer.encode(docs[order[slot]], True, True))
      if slot < len(docs):
        first_epoch.append(tokenizer.decode(doc))
  assert collections.Counter(first_epoch) == collections.Counter(docs)


def test_no_attention_across_documents_and_positions_restart(tmp_path):
  _, config = _single_domain(tmp_path)
  batches = take(loader.train_iterator(config, seed=0), 30)
  for lane in range(config.batch_size):
    rows = [(b["tokens"][lane], b["segment_ids"][lane], b["positions"][lane])
            for b in batches]
    # The document index of every token of the lane's stream: count the BOS tokens.
    doc_of = np.cumsum(np.concatenate([t for t, s, _ in rows]) == BOS).reshape(len(rows), -1)
    for (tokens, segments, positions), docs in zip(rows, doc_of, strict=True):
      assert (np.diff(segments[segments > 0]) >= 0).all()
      for segment in np.unique(segments[segments > 0]):
        piece = segments == segment
        assert len(np.unique(docs[piece])) == 1  # Same segment => same document.
        np.testing.assert_array_equal(positions[piece], np.arange(piece.sum()))
        inner = tokens[piece][1:-1]
        assert BOS not in inner and EOS not in inner
      # Different documents in a row always get different segments.
      for a in np.unique(docs[segments > 0]):
        assert len(np.unique(segments[(docs == a) & (segments > 0)])) == 1
      assert (positions[tokens == BOS] == 0).all()

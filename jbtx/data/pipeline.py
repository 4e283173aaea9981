"""Batches of packed, tokenized documents for training and evaluation."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import numpy as np

from jbtx.config import DataConfig
from jbtx.data import demo, packing
from jbtx.data.tokenizers import ByteTokenizer

Batch = dict[str, np.ndarray]


def documents(config: DataConfig, split: str) -> list[str]:
  """Texts of `split` of the configured corpus."""
  if config.corpus == "stdlib_code":
    return demo.code_documents(split, config.validation_fraction)
  raise ValueError(f"config key 'data.corpus': unknown corpus {config.corpus!r}")


def document_batches(texts: Sequence[str], tokenizer: ByteTokenizer, seq_len: int,
                     batch_size: int, seed: int | None) -> Iterator[Batch]:
  """Packed batches `{"tokens", "segment_ids", "positions"}`, each int32 `[batch, seq_len]`.

  With a `seed`, documents are reshuffled every epoch and batches repeat forever; with
  None, one pass in order (for evaluation).
  """
  epochs = itertools.count() if seed is not None else [None]
  for epoch in epochs:
    order = (np.random.default_rng([seed, epoch]).permutation(len(texts))
             if seed is not None else range(len(texts)))
    docs = (tokenizer.encode(texts[i], add_bos=True, add_eos=True) for i in order)
    yield from packing.batches(packing.pack(docs, seq_len, tokenizer.pad_id), batch_size)

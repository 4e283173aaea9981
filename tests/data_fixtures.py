"""Small corpora written by the data tests themselves, and ways to read batches back."""

from __future__ import annotations

import json
import pathlib

import numpy as np

from jbtx.config import DataConfig, from_mapping

BOS, EOS = 256, 257  # ByteTokenizer


def texts(prefix: str, n: int, seed: int = 0) -> list[str]:
  """`n` distinct documents of varied length (1 to ~60 bytes) tagged `prefix<i>:`."""
  rng = np.random.default_rng(seed)
  return [f"{prefix}{i}:" + "".join(rng.choice(list("abcdefgh xyz"), rng.integers(0, 50)))
          for i in range(n)]


def write_jsonl(path: pathlib.Path, docs: list[str]) -> pathlib.Path:
  path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
  return path


def files_config(tmp_path: pathlib.Path, domains: dict[str, tuple[list[str], float]],
                 **data) -> DataConfig:
  """A DataConfig of "files" domains: name -> (train documents, weight)."""
  spec = {}
  for name, (docs, weight) in domains.items():
    path = write_jsonl(tmp_path / f"{name}.jsonl", docs)
    spec[name] = {"source": "files", "splits": {"train": str(path),
                                                  "validation": str(path)}, "weight": weight}
  return from_mapping(DataConfig, {"domains": spec, "data_dir": str(tmp_path / "cache"),
                                   "prefetch": 0} | data)


def take(iterator, n: int) -> list[dict[str, np.ndarray]]:
  return [next(iterator) for _ in range(n)]


def lane_documents(batches: list[dict[str, np.ndarray]], lane: int) -> list[np.ndarray]:
  """The documents (BOS … EOS token arrays) row `lane` of a single-domain stream packed,
  in order; the last one may be cut off."""
  stream = np.concatenate([b["tokens"][lane][b["segment_ids"][lane] > 0] for b in batches])
  starts = np.flatnonzero(stream == BOS)
  return np.split(stream, starts[1:])

"""Random-access document sources: text lists, local files, TFDS datasets.

A source is a sequence of documents: `len(source)` and `source[i] -> str`. Local files
(`.txt`, `.jsonl`, each optionally `.gz`) are indexed once when opened: every document's
byte range is recorded and every JSONL line is checked for its text field, so a bad
file fails before training starts with an error naming the file, the line and the key.
Plain files are memory-mapped, gzip files decompressed into memory. Invalid UTF-8 is
replaced (U+FFFD) and counted in `invalid_utf8`, with one warning per file naming
the first bad document's line.
"""

from __future__ import annotations

import glob
import gzip
import json
import mmap
import pathlib
import re
import warnings
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np


class Source(Protocol):
  description: str

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> str: ...


class TextSource:
  """Documents held in memory."""

  def __init__(self, texts: Sequence[str], description: str):
    self._texts = texts
    self.description = description

  def __len__(self) -> int:
    return len(self._texts)

  def __getitem__(self, index: int) -> str:
    return self._texts[index]


_LINE = re.compile(rb"[^\n]+")


def _read(path: pathlib.Path) -> bytes | mmap.mmap:
  """The file's bytes: gzip decompressed into memory, otherwise memory-mapped."""
  if path.suffix == ".gz":
    try:
      return gzip.decompress(path.read_bytes())
    except (OSError, EOFError) as e:
      raise ValueError(f"{path}: not a readable gzip file ({e})") from None
  if path.stat().st_size == 0:
    return b""
  with path.open("rb") as f:
    return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def _format_of(path: pathlib.Path) -> str:
  name = path.name[:-3] if path.name.endswith(".gz") else path.name
  for ext in ("txt", "jsonl"):
    if name.endswith(f".{ext}"):
      return ext
  raise ValueError(f"{path}: unsupported file type; expected .txt, .jsonl, .txt.gz or "
                   ".jsonl.gz")


def _line_spans(data: bytes | mmap.mmap) -> list[tuple[int, int]]:
  """(start, end) byte offsets of the non-blank lines of `data`."""
  return [m.span() for m in _LINE.finditer(data) if data[m.start():m.end()].strip()]


def _line_number(data: bytes | mmap.mmap, offset: int) -> int:
  return data[:offset].count(b"\n") + 1


def _jsonl_spans(path: pathlib.Path, data: bytes | mmap.mmap,
                 text_key: str) -> list[tuple[int, int]]:
  """Line spans of a JSONL file, each checked to be an object with a string `text_key`."""
  spans = _line_spans(data)
  for start, end in spans:
    try:
      record = json.loads(bytes(data[start:end]).decode("utf-8", errors="replace"))
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{_line_number(data, start)}: not valid JSON ({e.msg})"
                       ) from None
    if not isinstance(record, dict) or text_key not in record:
      raise ValueError(f"{path}:{_line_number(data, start)}: no text field {text_key!r} "
                       "(config key 'text_key')")
    if not isinstance(record[text_key], str):
      raise ValueError(f"{path}:{_line_number(data, start)}: field {text_key!r} is not a "
                       "string")
  return spans


class FileSource:
  """Documents from local files matching a glob, in sorted path order.

  Args:
    pattern: a glob (`**` recurses); `~` is expanded.
    text_key: the text field of JSONL lines.
    txt_unit: "file" (a `.txt` file is one document) or "line" (one per non-blank line).
  """

  def __init__(self, pattern: str, text_key: str = "text", txt_unit: str = "file"):
    self.description = pattern
    self._text_key = text_key
    paths = sorted(pathlib.Path(p) for p in glob.glob(str(pathlib.Path(pattern).expanduser()),
                                                      recursive=True))
    paths = [p for p in paths if p.is_file()]
    if not paths:
      raise FileNotFoundError(f"no files match {pattern!r}")
    self.invalid_utf8 = 0
    self._data, self._formats, index = [], [], []
    for path in paths:
      fmt = _format_of(path)
      data = _read(path)
      if fmt == "jsonl":
        spans = _jsonl_spans(path, data, text_key)
      elif txt_unit == "line":
        spans = _line_spans(data)
      else:
        spans = [(0, len(data))] if re.search(rb"\S", data) else []
      index.extend((len(self._data), start, end) for start, end in spans)
      self._data.append(data)
      self._formats.append(fmt)
      self._count_invalid(path, data, spans)
    if not index:
      raise ValueError(f"empty dataset: the files matching {pattern!r} contain no documents")
    self._paths = paths
    self._index = np.asarray(index, np.int64)

  def _count_invalid(self, path: pathlib.Path, data, spans) -> None:
    """Counts documents with invalid UTF-8 (replaced when read); warns once per file."""
    try:
      bytes(data).decode("utf-8")
      return
    except UnicodeDecodeError:
      pass
    bad = []
    for start, end in spans:
      try:
        bytes(data[start:end]).decode("utf-8")
      except UnicodeDecodeError:
        bad.append(start)
    self.invalid_utf8 += len(bad)
    if bad:
      warnings.warn(f"{path}:{_line_number(data, bad[0])}: invalid UTF-8 in {len(bad)} "
                    "document(s), replaced with U+FFFD", stacklevel=3)

  def __len__(self) -> int:
    return len(self._index)

  def __getitem__(self, index: int) -> str:
    file, start, end = self._index[index].tolist()
    text = bytes(self._data[file][start:end]).decode("utf-8", errors="replace")
    if self._formats[file] == "jsonl":
      return json.loads(text)[self._text_key]
    return text


class TfdsSource:
  """One split of a TFDS dataset read through `tfds.data_source` (ArrayRecord; no TF)."""

  def __init__(self, data_source: Any, text_key: str, description: str):
    self._data = data_source
    self._text_key = text_key
    self.description = description
    if len(self._data) == 0:
      raise ValueError(f"empty dataset: {description} has no examples")
    first = self._data[0]
    if text_key not in first:
      raise ValueError(f"{description}: examples have no feature {text_key!r} (config key "
                       f"'text_key'); features are {', '.join(sorted(first))}")

  def __len__(self) -> int:
    return len(self._data)

  def __getitem__(self, index: int) -> str:
    text = self._data[index][self._text_key]
    return text.decode("utf-8", errors="replace") if isinstance(text, bytes) else str(text)


def tfds_source(name: str, split: str, data_dir: str, text_key: str) -> TfdsSource:
  """`split` of the prepared TFDS dataset `name` under `data_dir` (never downloads).

  Raises:
    ValueError: unknown dataset, a dataset not prepared under `data_dir`, unknown split.
  """
  import tensorflow_datasets as tfds

  try:
    data = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
  except tfds.core.registered.DatasetNotFoundError:
    raise ValueError(f"unknown TFDS dataset {name!r} (config key 'name')") from None
  except (AssertionError, NotImplementedError):  # Registered, but no ArrayRecord files.
    raise ValueError(f"TFDS dataset {name!r} is not prepared as ArrayRecord under "
                     f"{data_dir or 'the TFDS default data dir'} (prepare it with "
                     "file_format='array_record'; jbtx never downloads)") from None
  except ValueError as e:
    raise ValueError(f"TFDS dataset {name!r}: bad split {split!r}: {e}") from None
  return TfdsSource(data, text_key, f"tfds:{name}[{split}]")

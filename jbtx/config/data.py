"""Training data: corpora, sequence length and batch size."""

from __future__ import annotations

import dataclasses
from typing import Literal

from jbtx.config.base import require as _require


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Training data.

  Attributes:
    corpus: "stdlib_code" (built in: the interpreter's standard library sources).
    seq_len: tokens per packed row.
    batch_size: rows per step (global batch).
    validation_fraction: share of documents held out for validation.
  """

  corpus: Literal["stdlib_code"] = "stdlib_code"
  seq_len: int = 256
  batch_size: int = 16
  validation_fraction: float = 0.05

  def __post_init__(self):
    _require(self.seq_len > 1, "seq_len", f"must be at least 2, got {self.seq_len}")
    _require(self.batch_size > 0, "batch_size", f"must be positive, got {self.batch_size}")
    _require(0 < self.validation_fraction < 1, "validation_fraction",
             f"must be in (0, 1), got {self.validation_fraction}")

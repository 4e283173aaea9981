"""The training run of one stage: steps, logging, evaluation and samples."""

from __future__ import annotations

import dataclasses

from jbtx.config.base import require as _require
from jbtx.config.base import require_positive as _require_positive


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """The training run of one stage.

  Attributes:
    steps: optimizer steps.
    log_every: steps between log lines (each line averages the steps since the last).
    eval_batches: validation batches for the loss/perplexity report.
    sample_prompt: text continued after training, as a qualitative check.
    sample_tokens: tokens to generate (0 = no sample).
    sample_temperature: sampling temperature of that continuation (0 = greedy).
  """

  steps: int = 200
  log_every: int = 20
  eval_batches: int = 8
  sample_prompt: str = "def "
  sample_tokens: int = 80
  sample_temperature: float = 0.8

  def __post_init__(self):
    _require_positive(self, "steps", "log_every", "eval_batches")
    _require(self.sample_tokens >= 0, "sample_tokens",
             f"must be non-negative, got {self.sample_tokens}")
    _require(self.sample_temperature >= 0, "sample_temperature",
             f"must be non-negative (0 = greedy), got {self.sample_temperature}")

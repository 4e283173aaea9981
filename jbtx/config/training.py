"""The training run of one stage: steps, checkpoints, logging, evaluation and samples."""

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
    eval_batches: validation batches per domain for the loss/perplexity report.
    eval_every: steps between validation passes during training (0 = only before and
      after); each one also re-weights the domains when `data.reweighting` is "loss".
    sample_prompt: text continued after training, as a qualitative check.
    sample_tokens: tokens to generate (0 = no sample).
    sample_temperature: sampling temperature of that continuation (0 = greedy).
    checkpoint_every: steps between resumable checkpoints (`<stage>/checkpoints/<step>`).
    keep_last: how many of the latest resumable checkpoints to keep.
    keep_every: also keep every checkpoint whose step is a multiple of this (0 = none).
    async_checkpoints: write checkpoints in the background while training continues.
    max_skipped_steps: stop after this many consecutive steps skipped for a non-finite
      loss or gradient.
    peak_flops_per_device: peak FLOP/s of one device for MFU; 0 = look it up from
      the device kind (MFU is not reported when unknown, e.g. on CPU).
    tensorboard: write TensorBoard event files under `<stage>/tensorboard`.
  """

  steps: int = 200
  log_every: int = 20
  eval_batches: int = 8
  eval_every: int = 0
  sample_prompt: str = "def "
  sample_tokens: int = 80
  sample_temperature: float = 0.8
  checkpoint_every: int = 100
  keep_last: int = 2
  keep_every: int = 0
  async_checkpoints: bool = True
  max_skipped_steps: int = 10
  peak_flops_per_device: float = 0.0
  tensorboard: bool = True

  def __post_init__(self):
    _require_positive(self, "steps", "log_every", "eval_batches", "checkpoint_every",
                      "keep_last", "max_skipped_steps")
    _require(self.sample_tokens >= 0, "sample_tokens",
             f"must be non-negative, got {self.sample_tokens}")
    _require(self.sample_temperature >= 0, "sample_temperature",
             f"must be non-negative (0 = greedy), got {self.sample_temperature}")
    _require(self.eval_every >= 0, "eval_every",
             f"must be non-negative (0 = only before and after), got {self.eval_every}")
    _require(self.keep_every >= 0, "keep_every",
             f"must be non-negative (0 = none), got {self.keep_every}")
    _require(self.peak_flops_per_device >= 0, "peak_flops_per_device",
             f"must be non-negative (0 = from the device kind), got "
             f"{self.peak_flops_per_device}")


def profile_window(value: str) -> tuple[int, int] | None:
  """The steps to trace from `profile_steps`: "FIRST,LAST" (1-based, inclusive), "" = none.

  Raises:
    ValueError: when `value` is not two integers 1 <= FIRST <= LAST.
  """
  if not value:
    return None
  parts = value.split(",")
  if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
    raise ValueError(f'expected "FIRST,LAST" step numbers such as "10,15", got {value!r}')
  first, last = (int(p) for p in parts)
  if not 1 <= first <= last:
    raise ValueError(f"expected 1 <= FIRST <= LAST, got {value!r}")
  return first, last

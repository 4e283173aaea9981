"""Stopping a run of non-finite training steps."""

from __future__ import annotations


class SkipGuard:
  """Counts consecutive skipped (non-finite) steps and stops the run after too many."""

  def __init__(self, max_consecutive: int, stage: str):
    self.max_consecutive = max_consecutive
    self.stage = stage
    self.consecutive = 0
    self.total = 0

  def update(self, step: int, skipped: bool) -> None:
    """Records whether `step` was skipped.

    Raises:
      FloatingPointError: after `max_consecutive` skipped steps in a row.
    """
    self.consecutive = self.consecutive + 1 if skipped else 0
    self.total += int(skipped)
    if self.consecutive >= self.max_consecutive:
      raise FloatingPointError(
          f"[{self.stage}] {self.consecutive} consecutive steps up to step {step} had a "
          f"non-finite loss or gradient and were skipped (config key "
          f"'train.max_skipped_steps' = {self.max_consecutive}); the parameters stay as "
          f"after step {step - self.consecutive}. Lower optimizer.learning_rate or check "
          "the data")

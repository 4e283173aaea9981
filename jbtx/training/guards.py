"""Stopping training cleanly: preemption signals and runs of non-finite steps."""

from __future__ import annotations

import signal
import types

import jax
import numpy as np
from jax.experimental import multihost_utils

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignal:
  """Catches SIGTERM/SIGINT while active, so the loop can checkpoint and exit 0.

  The first signal only sets a flag that `requested` reports after the current step;
  a second one interrupts at once (KeyboardInterrupt). With several processes,
  `requested` is a collective call, true on all of them once any one was signalled, so
  they stop at the same step.
  """

  def __init__(self):
    self.received: int | None = None
    self._previous: dict[int, object] = {}

  def __enter__(self) -> StopSignal:
    for sig in _SIGNALS:
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc_info) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def _handle(self, signum: int, frame: types.FrameType | None) -> None:
    if self.received is not None:
      raise KeyboardInterrupt
    self.received = signum

  def requested(self) -> bool:
    """Whether any process was signalled (a collective call with several processes)."""
    flag = self.received is not None
    if jax.process_count() > 1:
      flag = bool(np.max(multihost_utils.process_allgather(np.int32(flag))))
    return flag


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

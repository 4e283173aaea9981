"""Stopping a run cleanly: preemption signals, and the exception that reports the stop.

`StopSignal` is held for the whole run; the training loop checks it after every step
and raises `Preempted` once its checkpoint is saved, and the pipeline checks it
between stages. The command exits 0 and a rerun resumes.
"""

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


class Preempted(Exception):
  """The run stopped on SIGTERM/SIGINT after checkpointing `step` of `stage` (None: at
  the end of the stage, between stages); a rerun resumes."""

  def __init__(self, stage: str, step: int | None = None):
    super().__init__(f"[{stage}] stopped by signal after step {step}; checkpoint saved, "
                     "rerun the same command to resume" if step is not None else
                     f"[{stage}] stopped by signal after the stage; rerun the same command "
                     "to continue")
    self.step = step

"""A `jax.profiler` trace over a window of steps, and dumps of the train step's HLO."""

from __future__ import annotations

import pathlib
from typing import Any

import jax


class ProfileWindow:
  """Traces steps `first..last` (inclusive) into `logdir` for TensorBoard / Perfetto.

  The trace lands in `logdir/plugins/profile/<timestamp>/` (TensorBoard's profile
  plugin reads it there; `*.trace.json.gz` opens in ui.perfetto.dev).
  """

  def __init__(self, window: tuple[int, int] | None, logdir: pathlib.Path):
    self.window = window
    self.logdir = logdir
    self.active = False

  def before_step(self, step: int) -> None:
    """Call before running step `step` (1-based)."""
    if self.window is not None and step == self.window[0]:
      jax.profiler.start_trace(str(self.logdir), create_perfetto_trace=True)
      self.active = True

  def after_step(self, step: int, outputs: Any) -> bool:
    """Call after dispatching step `step`; returns True when the trace was just written."""
    if not self.active or self.window is None or step < self.window[1]:
      return False
    self.stop(outputs)
    return True

  def stop(self, outputs: Any) -> None:
    """Ends the trace (if running) once `outputs` are computed."""
    if self.active:
      jax.block_until_ready(outputs)
      jax.profiler.stop_trace()
      self.active = False


def dump_hlo(jitted: Any, args: tuple[Any, ...], directory: pathlib.Path,
             name: str) -> list[pathlib.Path]:
  """Writes `<name>.stablehlo.txt` (as lowered) and `<name>.hlo.txt` (as compiled by XLA).

  Args:
    jitted: a `jax.jit`-wrapped function.
    args: example arguments (arrays or `jax.ShapeDtypeStruct`s with shardings).
    directory: where to write.
    name: the file name stem.
  """
  directory.mkdir(parents=True, exist_ok=True)
  lowered = jitted.lower(*args)
  paths = [directory / f"{name}.stablehlo.txt", directory / f"{name}.hlo.txt"]
  paths[0].write_text(lowered.as_text())
  paths[1].write_text(lowered.compile().as_text())
  return paths

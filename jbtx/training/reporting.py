"""Training progress for people: a console progress bar and TensorBoard event files.

Only process 0 reports; on other processes every method does nothing.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import numpy as np
import tqdm
from tensorboardX import SummaryWriter


def format_line(stage: str, step: int, summary: dict[str, Any], extra: dict[str, float]) -> str:
  """One console line: loss, aux losses, expert load range, grad norm, lr, tokens/s, MFU."""
  parts = [f"[{stage}] step {step:5d}", f"loss {summary['loss']:.4f}"]
  if "expert_load" in summary:  # Expert load range over layers and experts (balanced: 1/E).
    load = summary["expert_load"]
    parts += [f"aux {summary['aux_loss']:.4f}", f"expert load {load.min():.3f}-{load.max():.3f}"]
  parts += [f"grad_norm {summary['grad_norm']:.3f}", f"lr {summary['learning_rate']:.2e}",
            f"{extra['tokens_per_second']:,.0f} tokens/s"]
  mfu = extra.get("mfu")
  parts.append(f"MFU {100 * mfu:.1f}%" if mfu is not None else "MFU n/a")
  if summary.get("skipped"):
    parts.append(f"skipped {int(summary['skipped'])}")
  return "  ".join(parts)


class Reporter:
  """Progress bar, console lines and (optionally) TensorBoard scalars of one stage."""

  def __init__(self, stage: str, total_steps: int, initial_step: int,
               logdir: pathlib.Path | None):
    self.stage = stage
    self.enabled = jax.process_index() == 0
    self._bar = tqdm.tqdm(total=total_steps, initial=initial_step, desc=stage, unit="step",
                          dynamic_ncols=True, disable=not self.enabled)
    self._writer = SummaryWriter(str(logdir)) if self.enabled and logdir else None

  def write(self, line: str) -> None:
    """A console line above the progress bar."""
    if self.enabled:
      self._bar.write(line)

  def advance(self) -> None:
    self._bar.update()

  def train(self, step: int, summary: dict[str, Any], extra: dict[str, float]) -> None:
    """Logs a window summary (`MetricWindow.summary`) plus derived rates at `step`."""
    self.write(format_line(self.stage, step, summary, extra))
    scalars = {k: v for k, v in summary.items() if np.ndim(v) == 0 and k != "steps"}
    self.scalars("train", step, scalars | {k: v for k, v in extra.items() if v is not None})
    if self._writer is not None and "expert_load" in summary:
      for layer, load in enumerate(summary["expert_load"]):
        self._writer.add_histogram(f"expert_load/layer_{layer:02d}", load, step)
        self._writer.add_scalar(f"expert_load_max_over_balanced/layer_{layer:02d}",
                                float(load.max() * load.size), step)

  def scalars(self, prefix: str, step: int, values: dict[str, float]) -> None:
    """TensorBoard scalars `prefix/key`."""
    if self._writer is not None:
      for key, value in values.items():
        self._writer.add_scalar(f"{prefix}/{key}", float(value), step)

  def close(self) -> None:
    self._bar.close()
    if self._writer is not None:
      self._writer.close()

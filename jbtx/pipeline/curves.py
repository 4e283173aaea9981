"""Quality against training compute: each results row's validation loss as its
method's training FLOPs accumulate (the BTX paper's Figure 2 in kind).

    curve = row_curve(stages, kind.output)   # [{"flops", "loss", "domains"}, …]

A trained row's curve is its own stage's validation passes (`train.eval_every`, and
before and after training, as recorded in its `jbtx.json`), placed after the compute
of the other stages the row counts: BTX's finetune starts at its experts' FLOPs, so
its curve ends at the row's FLOPs. A row that trains nothing itself (BTM's ensembles
and averages) is one point at its row's FLOPs. `loss` is the mean of the domains'
losses, as the results table averages them.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from jbtx.interop import checkpoint
from jbtx.pipeline.workdir import recorded_compute

Point = dict[str, Any]
NOTE = ("validation loss (mean over domains, and each domain's) at the row's training "
        "FLOPs so far: its own stage's validation passes after the compute of the stages "
        "before it (btx: the experts', then the finetune's); one point for a row that "
        "trains nothing of its own")


def point(flops: float, domains: Mapping[str, float]) -> Point:
  """A curve point: training FLOPs so far, the mean loss over `domains` and each one's."""
  return {"flops": float(flops), "loss": float(np.mean(list(domains.values()))),
          "domains": {d: float(v) for d, v in domains.items()}}


def row_curve(stages: Sequence[str], output: Callable[[str], pathlib.Path]) -> list[Point]:
  """The curve of a row whose training is `stages` (the row's own stage last), each
  stage's checkpoint at `output(stage)`. Empty when its stage recorded no curve (a
  converted checkpoint)."""
  *before, own = stages
  offset = sum(recorded_compute(output(s))["flops"] for s in before)
  metrics = checkpoint.read_record(output(own)).get("metrics", {})
  if "curve" not in metrics:
    return []
  flops, steps = metrics["compute"]["flops"], metrics["steps"]
  return [point(offset + flops * p["step"] / steps, p["domains"]) for p in metrics["curve"]]


def ensemble_point(row: Mapping[str, Any]) -> list[Point]:
  """The one-point curve of a results row that trains nothing of its own."""
  return [point(row["compute"]["flops"], {d: v["loss"] for d, v in row["domains"].items()})]


def improvement(curve: Sequence[Mapping[str, Any]], window: float) -> float:
  """The relative drop of the loss over the last `window` fraction of a stage's steps,
  `(L(s) - L(end)) / L(s)` at step s = (1 - window) · steps (e.g. step 3200 of 4000).

  Args:
    curve: a stage's recorded points `{"step", "loss", …}` (its `jbtx.json`), in order.
    window: the fraction of the steps, e.g. 0.2.

  Raises:
    ValueError: if no validation pass was recorded at step s.
  """
  final = curve[-1]
  start = round((1 - window) * final["step"])
  at_start = [p for p in curve if p["step"] == start]
  if not at_start:
    raise ValueError(f"the curve has no validation pass at step {start}; set "
                     "train.eval_every to a divisor of it")
  return (at_start[0]["loss"] - final["loss"]) / at_start[0]["loss"]

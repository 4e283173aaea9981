"""The dense baseline (`btx.baselines` lists "dense"): the seed trained further on the
finetune mixture for BTX's training FLOPs."""

from __future__ import annotations

from jbtx.pipeline.baseline import TrainedBaseline
from jbtx.pipeline.registry import register


@register
class Dense(TrainedBaseline):
  name = "dense"
  row_order = 31

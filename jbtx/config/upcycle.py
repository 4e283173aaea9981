"""Sparse upcycling: the seed's FFN copied into every expert of an MoE."""

from __future__ import annotations

import dataclasses

from jbtx.config.base import require_positive


@dataclasses.dataclass(frozen=True)
class UpcycleConfig:
  """The upcycling baseline (`btx.baselines` lists "upcycle"): the seed with its FFNs
  copied into as many experts as BTX mixes, a new router and `btx.moe` routing, trained
  on the finetune mixture for BTX's training FLOPs.

  Attributes:
    every: an MoE layer every this many layers (2 = every other layer, as sparse
      upcycling's decoders; 1 = all, as BTX).
  """

  every: int = 1

  def __post_init__(self):
    require_positive(self, "every")

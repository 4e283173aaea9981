"""The optimizer: AdamW, its schedule, clipping, freezing and gradient accumulation."""

from __future__ import annotations

import dataclasses
from typing import Literal

from jbtx.config.base import require as _require

Freeze = Literal["none", "experts", "all_but_router"]


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """AdamW with linear warmup and cosine decay to `min_lr_ratio * learning_rate`.

  `freeze`: "none"; "experts" (train everything but the MoE expert FFNs); or
  "all_but_router" (train only the MoE routers). Frozen parameters get no update.
  `router_lr_multiplier` / `experts_lr_multiplier` scale the learning rate (and so the
  decoupled weight decay) of the MoE routers / expert FFNs (`optimizer.parameter_group`).
  `grad_accum_steps`: micro-batches per step; the global batch is split into that many
  micro-batches whose gradients are summed, token-weighted, before one update.
  `moment_dtype`: how Adam's first and second moments are stored ("bfloat16" halves
  their memory; the update is computed in float32 either way).
  """

  learning_rate: float = 3e-3
  warmup_steps: int = 20
  min_lr_ratio: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  grad_clip_norm: float = 1.0
  freeze: Freeze = "none"
  router_lr_multiplier: float = 1.0
  experts_lr_multiplier: float = 1.0
  grad_accum_steps: int = 1
  moment_dtype: Literal["float32", "bfloat16"] = "float32"

  def __post_init__(self):
    _require(self.learning_rate > 0, "learning_rate",
             f"must be positive, got {self.learning_rate}")
    _require(self.warmup_steps >= 0, "warmup_steps",
             f"must be non-negative, got {self.warmup_steps}")
    _require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio",
             f"must be in [0, 1], got {self.min_lr_ratio}")
    for key in ("b1", "b2"):
      _require(0 <= getattr(self, key) < 1, key, f"must be in [0, 1), got {getattr(self, key)}")
    _require(self.weight_decay >= 0, "weight_decay",
             f"must be non-negative, got {self.weight_decay}")
    _require(self.grad_clip_norm > 0, "grad_clip_norm",
             f"must be positive, got {self.grad_clip_norm}")
    for key in ("router_lr_multiplier", "experts_lr_multiplier"):
      _require(getattr(self, key) >= 0, key, f"must be non-negative, got {getattr(self, key)}")
    _require(self.grad_accum_steps > 0, "grad_accum_steps",
             f"must be positive, got {self.grad_accum_steps}")

"""Sparse upcycling (`btx.baselines` lists "upcycle"): the seed's FFN copied into as many
experts as BTX mixes, a new router, `btx.moe` routing, an MoE layer every
`upcycle.every` layers (`jbtx.methods.upcycle`); trained for BTX's FLOPs."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from jbtx.config import ConfigError, ExperimentConfig, ModelConfig
from jbtx.config.btx import SEED_EXPERT
from jbtx.interop import checkpoint
from jbtx.methods.upcycle import upcycle_params
from jbtx.pipeline.baseline import TrainedBaseline
from jbtx.pipeline.registry import register
from jbtx.pipeline.workdir import Paths


@register
class Upcycle(TrainedBaseline):
  name = "upcycle"
  row_order = 30

  def model_config(self, config: ExperimentConfig) -> ModelConfig:
    """The seed with `btx.moe` layers of as many experts as BTX mixes, each as wide as
    the seed's FFN, every `upcycle.every` layers."""
    btx = config.btx
    moe = dataclasses.replace(btx.moe, n_experts=len(btx.expert_names), d_ff=None,
                              every=config.upcycle.every)
    return dataclasses.replace(config.model, moe=moe)

  def initial_params(self, config: ExperimentConfig, paths: Paths,
                     derived: ExperimentConfig) -> Callable[[], Any]:
    scanned = dataclasses.replace(config.model, scan_layers=True)
    seed_dir = paths.model_dir(SEED_EXPERT)
    return lambda: upcycle_params(checkpoint.load_params_for(seed_dir, scanned),
                                  derived.model, config.seed)

  def validate(self, config: ExperimentConfig) -> None:
    every, layers = config.upcycle.every, config.model.n_layers
    if layers % every:
      raise ConfigError("upcycle.every", f"must divide model.n_layers ({layers}), got {every}")

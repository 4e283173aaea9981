"""OLMoE from scratch (`btx.baselines` lists "olmoe"): the seed's decoder with QK-norm
and `olmoe.moe` fine-grained MoE layers, trained on the finetune mixture for the seed's
FLOPs plus BTX's, since it has no seed to start from."""

from __future__ import annotations

import dataclasses
from typing import Any

from jbtx.config import ConfigError, ExperimentConfig, ModelConfig
from jbtx.pipeline import budgets
from jbtx.pipeline.baseline import TrainedBaseline
from jbtx.pipeline.registry import register
from jbtx.pipeline.workdir import Paths


@register
class OLMoE(TrainedBaseline):
  name = "olmoe"
  row_order = 33
  from_scratch = True

  def model_config(self, config: ExperimentConfig) -> ModelConfig:
    """The seed's decoder with QK-norm; `olmoe.moe.d_ff` None = d_ff / top_k."""
    moe = config.olmoe.moe
    moe = dataclasses.replace(moe, d_ff=moe.d_ff or config.model.d_ff // moe.top_k)
    return dataclasses.replace(config.model, qk_norm=True, moe=moe)

  def initial_params(self, config: ExperimentConfig, paths: Paths,
                     derived: ExperimentConfig) -> Any:
    return None  # a random init

  def check_files(self, config: ExperimentConfig) -> None:
    """olmoe trains from scratch for the seed's FLOPs plus BTX's: a seed checkpoint
    must record its training FLOPs."""
    if config.btx.seed_checkpoint and self.name in config.btx.baselines:
      try:
        budgets.seed_flops(config)
      except ConfigError as e:
        raise ConfigError("btx.baselines", f"olmoe needs the seed's training FLOPs: {e}") \
            from None

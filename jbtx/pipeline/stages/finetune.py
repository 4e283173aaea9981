"""BTX's MoE finetune: the mixed model trained on the finetune mixture (`btx.finetune`,
`btx.finetune_weights`) with `btx.moe` routing and its auxiliary losses. Its output is
the BTX model, the results table's "btx" row."""

from __future__ import annotations

from typing import Any

from jbtx.config import ExperimentConfig
from jbtx.interop import checkpoint
from jbtx.pipeline import budgets, experiments, identity
from jbtx.pipeline.registry import Stage, register
from jbtx.pipeline.stages.expert import expert_stages
from jbtx.pipeline.stages.mix import MIX, mix_identity
from jbtx.pipeline.workdir import Paths
from jbtx.runtime.signals import StopSignal
from jbtx.training.loop import train_stage

FINETUNE = "finetune"
BTX_ROW = "btx"


def finetune_stage(config: ExperimentConfig) -> list[str]:
  """The finetune stage when the experiment trains BTX (else none)."""
  return [FINETUNE] if config.btx.experts and config.btx.train_btx else []


@register
class Finetune(Stage):
  """`finetune/`: the BTX model."""

  name = FINETUNE
  phase = 21
  row_order = 90

  def stages(self, config: ExperimentConfig) -> list[str]:
    return finetune_stage(config)

  def wanted(self, config: ExperimentConfig) -> list[str]:
    return finetune_stage(config)

  def inputs(self, config: ExperimentConfig, stage: str) -> list[str]:
    return [MIX]

  def experiment(self, config: ExperimentConfig, stage: str) -> ExperimentConfig:
    return experiments.finetune_config(config)

  def identity(self, config: ExperimentConfig, stage: str) -> dict[str, Any]:
    return identity.training(self.experiment(config, stage)) | {"mix": mix_identity(config)}

  def run(self, config: ExperimentConfig, paths: Paths, stop: StopSignal, stage: str) -> None:
    derived = self.experiment(config, stage)
    mixed = paths.stage_dir(MIX)
    train_stage(derived, paths.stage_dir(FINETUNE), FINETUNE, stop,
                initial_params=lambda: checkpoint.load_params_for(mixed, derived.model),
                facts={"compute": budgets.compute(derived)})

  def rows(self, config: ExperimentConfig) -> dict[str, str]:
    return {BTX_ROW: FINETUNE}

  def row_training(self, config: ExperimentConfig, row: str) -> list[str]:
    """BTX's training: its experts and the finetune."""
    return [*expert_stages(config), FINETUNE]

"""The domain experts: the seed trained further on one domain each, as independent jobs.

`expert/<domain>` for every entry of `btx.experts`: the seed's parameters, a fresh
optimizer, that domain's data alone and the entry's own schedule.
"""

from __future__ import annotations

from typing import Any

from jbtx.config import ExperimentConfig
from jbtx.pipeline import budgets, experiments, identity
from jbtx.pipeline.registry import Stage, register
from jbtx.pipeline.stages.seed import SEED, seed_identity, seed_params
from jbtx.pipeline.workdir import Paths
from jbtx.runtime.signals import StopSignal
from jbtx.training.loop import train_stage

PREFIX = "expert/"


def expert_stage(domain: str) -> str:
  return f"{PREFIX}{domain}"


def expert_stages(config: ExperimentConfig) -> list[str]:
  """Every domain expert's stage, in the order of `btx.experts`."""
  return [expert_stage(domain) for domain in config.btx.experts]


@register
class Expert(Stage):
  """`expert/<domain>`: one dense expert per domain, trained from the seed."""

  name = "expert"
  phase = 10
  row_order = 10

  def stages(self, config: ExperimentConfig) -> list[str]:
    return expert_stages(config)

  def inputs(self, config: ExperimentConfig, stage: str) -> list[str]:
    return [SEED]

  def experiment(self, config: ExperimentConfig, stage: str) -> ExperimentConfig:
    return experiments.expert_config(config, stage.removeprefix(PREFIX))

  def identity(self, config: ExperimentConfig, stage: str) -> dict[str, Any]:
    return identity.training(self.experiment(config, stage)) | {"from_seed": seed_identity(config)}

  def run(self, config: ExperimentConfig, paths: Paths, stop: StopSignal, stage: str) -> None:
    derived = self.experiment(config, stage)
    train_stage(derived, paths.stage_dir(stage), stage, stop,
                initial_params=seed_params(config, paths),
                facts={"compute": budgets.compute(derived)})

  def rows(self, config: ExperimentConfig) -> dict[str, str]:
    return {domain: expert_stage(domain) for domain in config.btx.experts}

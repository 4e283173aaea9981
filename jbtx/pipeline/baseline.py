"""The trained baselines' common stage: a model trained on the finetune mixture, with
the finetune's schedule, for as many steps as give BTX's training FLOPs.

A baseline kind (`jbtx.pipeline.stages.upcycle`, `dense`, `llama_moe`, `olmoe`)
subclasses `TrainedBaseline` and says what differs: its model (`model_config`), its
starting parameters (`initial_params`: the seed as it is by default, or None for
from scratch, which also earns the seed's FLOPs) and its checks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

from jbtx.config import ExperimentConfig, ModelConfig
from jbtx.pipeline import budgets, experiments, identity
from jbtx.pipeline.registry import Stage
from jbtx.pipeline.stages.seed import SEED, seed_identity, seed_params
from jbtx.pipeline.workdir import Paths
from jbtx.runtime.signals import StopSignal
from jbtx.training.loop import train_stage


def baseline_config(config: ExperimentConfig, model: ModelConfig,
                    with_seed: bool = False) -> ExperimentConfig:
  """`model` trained on the finetune mixture with the finetune's schedule, for as many
  steps as match BTX's training FLOPs (plus the seed's `with_seed`), to within one
  step's."""
  derived = dataclasses.replace(experiments.finetune_config(config), model=model)
  steps = budgets.matched_steps(config, model, with_seed=with_seed)
  stage = dataclasses.replace(config.btx.finetune, steps=steps)
  return experiments.freezing_only_moe(experiments.with_training(derived, stage))


class TrainedBaseline(Stage):
  """A baseline trained for BTX's FLOPs; its stage, checkpoint and row share its name."""

  phase = 30
  baseline = True
  from_scratch: ClassVar[bool] = False  # True: no seed, and the seed's FLOPs too

  def model_config(self, config: ExperimentConfig) -> ModelConfig:
    """The baseline's model (default: the seed's)."""
    return config.model

  def initial_params(self, config: ExperimentConfig, paths: Paths,
                     derived: ExperimentConfig) -> Callable[[], Any] | None:
    """`() -> the parameters training starts from` (default: the seed's)."""
    return seed_params(config, paths)

  def stages(self, config: ExperimentConfig) -> list[str]:
    listed = config.btx.experts and self.name in config.btx.baselines
    return [self.name] if listed else []

  def wanted(self, config: ExperimentConfig) -> list[str]:
    return self.stages(config)

  def inputs(self, config: ExperimentConfig, stage: str) -> list[str]:
    return [] if self.from_scratch else [SEED]

  def experiment(self, config: ExperimentConfig, stage: str) -> ExperimentConfig:
    return baseline_config(config, self.model_config(config), with_seed=self.from_scratch)

  def training_experiment(self, config: ExperimentConfig, paths: Paths) -> ExperimentConfig:
    """The experiment `run` trains: `experiment`, with what only the workdir tells."""
    return self.experiment(config, self.name)

  def identity(self, config: ExperimentConfig, stage: str) -> dict[str, Any]:
    tree = identity.training(self.experiment(config, stage))
    return tree if self.from_scratch else tree | {"from_seed": seed_identity(config)}

  def run(self, config: ExperimentConfig, paths: Paths, stop: StopSignal, stage: str) -> None:
    derived = self.training_experiment(config, paths)
    train_stage(derived, paths.stage_dir(stage), stage, stop,
                initial_params=self.initial_params(config, paths, derived),
                facts={"compute": budgets.compute(derived)})

  def rows(self, config: ExperimentConfig) -> dict[str, str]:
    return {self.name: self.name}

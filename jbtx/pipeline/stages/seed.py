"""The seed: the dense model every other stage starts from.

Trained from scratch on the experiment's data (`config.model`), or, with
`btx.seed_checkpoint` set, a converted checkpoint (`python -m jbtx.convert import`)
used as it is: then the stage is complete from the start and trains nothing.
"""

from __future__ import annotations

import pathlib
from typing import Any

from jbtx.config import ConfigError, ExperimentConfig
from jbtx.config.btx import SEED_EXPERT
from jbtx.config.model import SHAPE_KEYS
from jbtx.interop import checkpoint
from jbtx.pipeline import budgets, experiments, identity
from jbtx.pipeline.registry import Stage, register
from jbtx.pipeline.workdir import Paths
from jbtx.runtime.signals import StopSignal
from jbtx.training.loop import train_stage

SEED = "seed"


def seed_identity(config: ExperimentConfig) -> dict[str, Any]:
  """What every stage that starts from the seed depends on through it."""
  if config.btx.seed_checkpoint:
    return {"btx.seed_checkpoint": config.btx.seed_checkpoint}
  return identity.training(experiments.seed_config(config))


def seed_params(config: ExperimentConfig, paths: Paths):
  """`() -> the seed's parameters` in the layout of `config.model`."""
  return lambda: checkpoint.load_params_for(paths.model_dir(SEED_EXPERT), config.model)


@register
class Seed(Stage):
  """The seed stage (alone when `btx.experts` is empty: a model trained from scratch)."""

  name = SEED
  phase = 0
  row_order = 0

  def stages(self, config: ExperimentConfig) -> list[str]:
    return [SEED]

  def wanted(self, config: ExperimentConfig) -> list[str]:
    return [] if config.btx.experts else [SEED]

  def experiment(self, config: ExperimentConfig, stage: str) -> ExperimentConfig | None:
    """The seed's training (None for a converted seed, which trains nothing)."""
    return None if config.btx.seed_checkpoint else experiments.seed_config(config)

  def identity(self, config: ExperimentConfig, stage: str) -> dict[str, Any]:
    return seed_identity(config)

  def check_files(self, config: ExperimentConfig) -> None:
    """A converted seed must have the shape of `config.model`."""
    if not config.btx.seed_checkpoint:
      return
    directory = config.btx.seed_checkpoint
    try:
      loaded = checkpoint.load_config(directory)
    except checkpoint.CheckpointError as e:
      raise ConfigError("btx.seed_checkpoint", str(e)) from None
    for key in SHAPE_KEYS:
      if getattr(loaded, key) != getattr(config.model, key):
        raise ConfigError(f"model.{key}", f"the seed checkpoint {directory} has "
                          f"{getattr(loaded, key)!r}, the config {getattr(config.model, key)!r}")

  def run(self, config: ExperimentConfig, paths: Paths, stop: StopSignal, stage: str) -> None:
    derived = experiments.seed_config(config)
    train_stage(derived, paths.stage_dir(SEED), SEED, stop,
                facts={"compute": budgets.compute(derived)})

  def output(self, paths: Paths, stage: str) -> pathlib.Path:
    return paths.model_dir(SEED_EXPERT)

  def done(self, paths: Paths, stage: str) -> bool:
    return bool(paths.config.btx.seed_checkpoint) or super().done(paths, stage)

  def rows(self, config: ExperimentConfig) -> dict[str, str]:
    return {SEED_EXPERT: SEED}

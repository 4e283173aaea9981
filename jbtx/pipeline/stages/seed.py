"""The seed: the dense model every other stage starts from.

Trained from scratch on the experiment's data (`config.model`), or, with
`btx.seed_checkpoint` set, a checkpoint used as it is, trained by nothing here. A
converted checkpoint (`python -m jbtx.convert import`) makes the stage complete from
the start. A jbtx-trained one (the shipped demo seed, `jbtx/data/demo/seed`) records its
validation losses: the stage then loads it and measures them again on this
experiment's validation batches, and refuses a seed whose losses differ
(`btx.check_seed`), writing the comparison to `seed/check.json`.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import jax

from jbtx.config import BTXConfig, ConfigError, EvalConfig, ExperimentConfig
from jbtx.config.btx import SEED_EXPERT
from jbtx.config.model import SHAPE_KEYS
from jbtx.eval.scoring import evaluate_params
from jbtx.interop import checkpoint
from jbtx.pipeline import budgets, experiments, identity
from jbtx.pipeline.registry import Stage, register
from jbtx.pipeline.workdir import Paths
from jbtx.runtime import files
from jbtx.runtime.distributed import log
from jbtx.runtime.signals import StopSignal
from jbtx.training.loop import train_stage

SEED = "seed"
CHECK_FILE = "check.json"
_CHECK_TOLERANCE = 1e-4  # relative: the same batches, another device count at most


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
    if config.btx.seed_checkpoint:
      check_recorded_losses(config, paths)
      return
    derived = experiments.seed_config(config)
    train_stage(derived, paths.stage_dir(SEED), SEED, stop,
                facts={"compute": budgets.compute(derived)})

  def output(self, paths: Paths, stage: str) -> pathlib.Path:
    return paths.model_dir(SEED_EXPERT)

  def done(self, paths: Paths, stage: str) -> bool:
    seed = paths.config.btx.seed_checkpoint
    if seed and paths.config.btx.check_seed and recorded_losses(seed):
      return (paths.stage_dir(SEED) / CHECK_FILE).is_file()
    return bool(seed) or super().done(paths, stage)

  def rows(self, config: ExperimentConfig) -> dict[str, str]:
    return {SEED_EXPERT: SEED}


def recorded_losses(directory: str | pathlib.Path) -> dict[str, float]:
  """The final validation loss per domain a jbtx-trained checkpoint records (none for
  a converted one)."""
  metrics = checkpoint.read_record(directory).get("metrics", {})
  return dict(metrics.get("validation", {}).get("domains", {}))


def check_recorded_losses(config: ExperimentConfig, paths: Paths) -> None:
  """Measures the seed checkpoint's validation loss on the domains it recorded and
  compares; writes `seed/check.json`.

  Raises:
    ConfigError: ('btx.seed_checkpoint') if a loss differs by more than 1e-4 relative.
  """
  directory = paths.model_dir(SEED_EXPERT)
  recorded = recorded_losses(directory)
  domains = [d for d in recorded if d in config.data.domains]
  losses_only = dataclasses.replace(config, btx=BTXConfig(task_examples=0), eval=EvalConfig())
  model_config = checkpoint.load_config(directory)
  params = checkpoint.load_params_for(directory, model_config)
  measured = evaluate_params(losses_only, model_config, params, domains)["domains"]
  comparison = {d: {"recorded": recorded[d], "measured": measured[d]["loss"]} for d in domains}
  for domain, losses in comparison.items():
    if abs(losses["measured"] - losses["recorded"]) > _CHECK_TOLERANCE * losses["recorded"]:
      raise ConfigError("btx.seed_checkpoint", f"{directory} records a validation loss of "
                        f"{losses['recorded']:.6f} on {domain}, but it measures "
                        f"{losses['measured']:.6f} on this experiment's validation batches: "
                        "a different checkpoint, or other data settings (data.seq_len, "
                        "data.batch_size, train.eval_batches) than it was trained with; "
                        "set btx.check_seed=False to use it anyway")
  if jax.process_index() == 0:
    files.write_json(paths.stage_dir(SEED) / CHECK_FILE, comparison)
  if comparison:
    log(f"[seed] {directory}: validation loss as recorded on "
        + ", ".join(f"{d} {v['measured']:.4f}" for d, v in comparison.items()))
  else:
    log(f"[seed] {directory}: none of its recorded domains ({', '.join(recorded)}) is one "
        "of this experiment's; its losses are not checked")

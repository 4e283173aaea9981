"""The work directory of a run: where each stage lives, when it is complete, and the
identity records that refuse a workdir made by another experiment.

    workdir/config.json         the experiment (`python -m jbtx.eval` reads it back)
    workdir/<stage>/stage.json  the stage's identity, written before anything else
    workdir/<stage>/            its output (a jbtx checkpoint for training stages)

A run whose experiment differs from a recorded identity is refused before anything is
written, with the keys named. The eval stage only reads models, so a changed
evaluation runs again instead (the old results kept as `results.json.old`).
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import ml_collections

from jbtx.config import ConfigError, ExperimentConfig, from_mapping, to_config_dict, to_dict
from jbtx.config.btx import SEED_EXPERT
from jbtx.interop import checkpoint
from jbtx.pipeline import identity, registry
from jbtx.runtime import files
from jbtx.runtime.distributed import log, sync_processes

CONFIG_FILE = "config.json"
STAGE_FILE = "stage.json"


class Paths:
  """Where each stage of a run lives, and whether it is complete."""

  def __init__(self, config: ExperimentConfig, workdir: pathlib.Path):
    self.config = config
    self.workdir = workdir

  def stage_dir(self, stage: str) -> pathlib.Path:
    return registry.kind_of(self.config, stage).directory(self.workdir, stage)

  def model_dir(self, name: str) -> pathlib.Path:
    """The checkpoint of a mixed model by expert name ("seed" or a domain)."""
    if name == SEED_EXPERT:
      seed = self.config.btx.seed_checkpoint
      return pathlib.Path(seed).absolute() if seed else self.workdir / "seed"
    return self.workdir / f"expert/{name}"

  def complete(self, stage: str) -> bool:
    return registry.kind_of(self.config, stage).done(self, stage)


def stage_identity(config: ExperimentConfig, stage: str) -> dict[str, Any]:
  """`stage`'s identity as recorded: `{dotted key: value}` without run-only keys."""
  return identity.flat_identity(registry.kind_of(config, stage).identity(config, stage))


def stage_file(paths: Paths, stage: str) -> pathlib.Path:
  return paths.stage_dir(stage) / STAGE_FILE


def read_identity(path: pathlib.Path) -> dict:
  """A stage's recorded identity; ConfigError naming the file if it is not JSON."""
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ConfigError("btx", f"{path} is not a stage record ({e}); remove the stage's "
                      "directory to redo it") from None


def _differences(config: ExperimentConfig, paths: Paths, stage: str) -> list[str]:
  """The keys of `stage`'s identity that differ from its record in the workdir."""
  path = stage_file(paths, stage)
  if not path.is_file():
    return []
  return identity.differences(read_identity(path), stage_identity(config, stage))


def check_workdir(config: ExperimentConfig, paths: Paths) -> None:
  """Raises ConfigError if a stage in the workdir was made by a different experiment.

  A stage that only reads models (the evaluation) is not refused: it runs again
  instead (`rerun_changed`), e.g. after baselines were added.
  """
  for stage in registry.stage_names(config):
    if registry.kind_of(config, stage).reruns_when_changed:
      continue
    differ = _differences(config, paths, stage)
    if differ:
      recorded = read_identity(stage_file(paths, stage))
      current = stage_identity(config, stage)
      shown = "; ".join(f"{k}: was {recorded.get(k, identity.UNSET)!r}, now "
                        f"{current.get(k, identity.UNSET)!r}" for k in differ[:5])
      more = f" (and {len(differ) - 5} more)" if len(differ) > 5 else ""
      raise ConfigError(differ[0], f"{paths.stage_dir(stage)} was made by another "
                        f"experiment ({shown}{more}); use another --workdir, or remove "
                        f"that directory to redo stage {stage}")


def record_identity(config: ExperimentConfig, paths: Paths, stage: str) -> None:
  """Writes the stage's identity (atomically) before the stage writes anything else."""
  if jax.process_index() != 0:
    return
  path = stage_file(paths, stage)
  path.parent.mkdir(parents=True, exist_ok=True)
  files.write_json(path, stage_identity(config, stage), indent=1)


def rerun_changed(config: ExperimentConfig, paths: Paths) -> None:
  """Sets aside the output of a finished stage that only reads models (the
  evaluation) when it was made for other models or settings, so that it runs again."""
  for stage in registry.stage_names(config):
    kind = registry.kind_of(config, stage)
    if not kind.reruns_when_changed:
      continue
    differ = _differences(config, paths, stage)
    if differ and kind.done(paths, stage) and jax.process_index() == 0:
      log(f"[btx] stage {stage}'s settings or inputs changed ({', '.join(differ[:3])}"
          f"{', …' if len(differ) > 3 else ''}); running it again")
      kind.set_aside(paths, stage)
  sync_processes(f"jbtx rerun changed {paths.workdir}")


def write_config(config: ExperimentConfig, workdir: pathlib.Path) -> None:
  """Records the experiment in `workdir/config.json` (process 0)."""
  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / CONFIG_FILE).write_text(json.dumps(to_dict(config), indent=2) + "\n")


def workdir_config(workdir: str | pathlib.Path) -> ml_collections.ConfigDict:
  """The experiment recorded in `workdir/config.json`, as overridable settings.

  Raises:
    ConfigError: ('workdir') if the file is missing or is not an experiment.
  """
  path = pathlib.Path(workdir) / CONFIG_FILE
  if not path.is_file():
    raise ConfigError("workdir", f"{path} not found: pass a directory made by "
                      "python -m jbtx.train")
  try:
    return to_config_dict(from_mapping(ExperimentConfig, json.loads(path.read_text())))
  except json.JSONDecodeError as e:
    raise ConfigError("workdir", f"{path} is not JSON ({e.msg})") from None


def recorded_compute(directory: pathlib.Path) -> dict[str, float]:
  """The training compute a checkpoint records (`{"tokens", "flops"}`; none: zeros)."""
  metrics = checkpoint.read_record(directory).get("metrics", {})
  return metrics.get("compute", {"tokens": 0, "flops": 0.0})

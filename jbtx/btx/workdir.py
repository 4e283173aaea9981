"""The work directory of a BTX run: where each stage lives, when it is complete, and
the identity record that refuses a workdir made by another experiment.

Every stage directory holds `stage.json`, the identity of the experiment that made it
(`stages.stage_identity`); a run whose experiment differs there is refused before
anything is written, with the keys named. The eval stage only reads models, so a
changed evaluation runs again instead (the old results kept as `results.json.old`).
"""

from __future__ import annotations

import json
import pathlib

import jax

from jbtx import checkpoint, files
from jbtx.btx import stages
from jbtx.btx.cbtm import SUMMARY_FILE
from jbtx.config import ConfigError, ExperimentConfig
from jbtx.config.btx import SEED_EXPERT
from jbtx.training.loop import log, sync_processes

STAGE_FILE = "stage.json"
RESULTS_FILE = "results.json"
HF_DIR = "hf"


class Paths:
  """Where each stage of a run lives."""

  def __init__(self, config: ExperimentConfig, workdir: pathlib.Path):
    self.workdir = workdir
    self.seed_checkpoint = config.btx.seed_checkpoint

  def stage_dir(self, stage: str) -> pathlib.Path:
    if stage == stages.EXPORT:
      return self.workdir / HF_DIR
    return self.workdir / stage

  def model_dir(self, name: str) -> pathlib.Path:
    """The checkpoint of a mixed model by expert name ("seed" or a domain)."""
    if name == SEED_EXPERT:
      return (pathlib.Path(self.seed_checkpoint).absolute() if self.seed_checkpoint
              else self.stage_dir(stages.SEED))
    return self.stage_dir(stages.expert_stage(name))

  def complete(self, stage: str) -> bool:
    if stage == stages.SEED and self.seed_checkpoint:
      return True
    marker = {stages.EVAL: self.workdir / RESULTS_FILE,
              stages.CLUSTERS: self.stage_dir(stages.CLUSTERS) / SUMMARY_FILE,
              stages.EXPORT: self.stage_dir(stages.EXPORT) / "config.json"}.get(
                  stage, self.stage_dir(stage) / checkpoint.CONFIG_FILE)
    return marker.is_file()


def stage_file(paths: Paths, stage: str) -> pathlib.Path:
  return paths.stage_dir(stage) / STAGE_FILE


def _differences(config: ExperimentConfig, paths: Paths, stage: str) -> list[str]:
  """The keys of `stage`'s identity that differ from its record in the workdir."""
  path = stage_file(paths, stage)
  if not path.is_file():
    return []
  return stages.identity_differences(read_identity(path), stages.stage_identity(config, stage))


def read_identity(path: pathlib.Path) -> dict:
  """A stage's recorded identity; ConfigError naming the file if it is not JSON."""
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ConfigError("btx", f"{path} is not a stage record ({e}); remove the stage's "
                      "directory to redo it") from None


def check_workdir(config: ExperimentConfig, paths: Paths) -> None:
  """Raises ConfigError if a stage in the workdir was made by a different experiment.

  The eval stage is not refused: it only reads models, so it runs again instead
  (`evaluate_again`), e.g. after baselines were added.
  """
  for stage in stages.stage_names(config):
    differ = _differences(config, paths, stage) if stage != stages.EVAL else []
    if differ:
      recorded = read_identity(stage_file(paths, stage))
      current = stages.stage_identity(config, stage)
      shown = "; ".join(f"{k}: was {recorded.get(k, '<unset>')!r}, now "
                        f"{current.get(k, '<unset>')!r}" for k in differ[:5])
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
  files.write_json(path, stages.stage_identity(config, stage), indent=1)


def evaluate_again(config: ExperimentConfig, paths: Paths) -> None:
  """Discards the results of an evaluation made for another set of models or settings."""
  differ = _differences(config, paths, stages.EVAL)
  results = paths.workdir / RESULTS_FILE
  if differ and results.is_file() and jax.process_index() == 0:
    log(f"[btx] the evaluation's settings or models changed ({', '.join(differ[:3])}"
        f"{', …' if len(differ) > 3 else ''}); evaluating again")
    results.rename(results.with_suffix(".json.old"))
  sync_processes(f"jbtx evaluate again {paths.workdir}")

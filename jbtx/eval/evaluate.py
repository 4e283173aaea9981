"""Evaluating a workdir that `python -m jbtx.train` made (`python -m jbtx.eval`).

    config = from_mapping(ExperimentConfig, workdir_config("runs/btx"))
    evaluate(config, pathlib.Path("runs/btx"), stage="finetune", output=None)

The experiment is the workdir's own (`config.json`), so the models are scored by the
eval stage's code (`jbtx.btx.eval_stage`) as the pipeline scored them.
"""

from __future__ import annotations

import json
import pathlib

import ml_collections

from jbtx.btx import eval_stage, stages
from jbtx.btx.results import table
from jbtx.btx.workdir import Paths
from jbtx.config import ConfigError, ExperimentConfig, from_mapping, to_config_dict
from jbtx.config.btx import SEED_EXPERT

CONFIG_FILE = "config.json"


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


def required_stages(config: ExperimentConfig, row: str) -> list[str]:
  """The stages whose outputs row `row` reads."""
  if row == SEED_EXPERT:
    return [stages.SEED]
  if row == "btx":
    return [stages.FINETUNE]
  if row == eval_stage.BTM_ROWS:
    if config.btm.clusters:
      return [stages.CLUSTERS, *(stages.cluster_stage(i) for i in range(config.btm.clusters))]
    return [stages.SEED, *(stages.expert_stage(name) for name in config.btx.experts)]
  if row in config.btx.experts:
    return [stages.expert_stage(row)]
  return [row]


def evaluate(config: ExperimentConfig, workdir: pathlib.Path, stage: str | None,
             output: pathlib.Path | None) -> pathlib.Path:
  """Evaluates `stage`'s model (None = all) of `workdir`; returns the results' path."""
  paths = Paths(config, workdir)
  rows = [eval_stage.row_of(config, stage)] if stage else eval_stage.row_names(config)
  missing = sorted({s for r in rows for s in required_stages(config, r)
                    if not paths.complete(s)})
  if missing:
    raise ConfigError("stage", f"{', '.join(missing)} not complete in {workdir}: finish "
                      "the run first (python -m jbtx.train with the same config and "
                      "--workdir)")
  results = eval_stage.evaluate_rows(stages.eval_config(config), paths, rows)
  output = output or workdir / stages.EVAL / f"results.{stage or 'all'}.json".replace("/", "_")
  eval_stage.write_results(results, output)
  print(table(results))
  return output

r"""`python -m jbtx.eval`: score the models of a workdir that `python -m jbtx.train` made.

    python -m jbtx.eval --workdir=runs/btx [--stage=finetune] [--output=FILE]
                        [--config.eval.tasks="('my_task.jsonl',)"] [--config.KEY=VALUE ...]

The experiment is the workdir's own (`config.json`, written by the training run), so
the models are evaluated as the pipeline's eval stage evaluates them, by the same
code (`jbtx.btx.eval_stage`): per-domain perplexity (dense, MoE and BTM ensembles),
the demo math and knowledge tasks, the task files of `eval.tasks` (exact match or
multiple choice, `jbtx.eval.task_files`), and routing statistics and plots for MoE
models. `--stage` picks one model: a row of the results table (seed, an expert's
domain, btm, upcycle, dense, llama_moe, olmoe, btx) or the stage that trains it
(finetune, expert/<domain>); the default is every model. Any `--config.` key can be
overridden (e.g. `train.eval_batches`, `btx.task_examples`, `mesh.*`). The results go
to `--output` (default `workdir/eval/results.<stage>.json`, or `results.all.json`),
and the table to the console.
"""

from __future__ import annotations

import json
import pathlib
import sys

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from jbtx import distributed
from jbtx.btx import eval_stage, stages
from jbtx.btx.results import table
from jbtx.btx.workdir import Paths
from jbtx.config import ConfigError, ExperimentConfig, from_mapping, to_config_dict
from jbtx.config.btx import SEED_EXPERT

CONFIG_FILE = "config.json"

_WORKDIR = flags.DEFINE_string("workdir", None, "A workdir made by python -m jbtx.train.")
_STAGE = flags.DEFINE_string("stage", None, "One model (e.g. finetune, seed, math, btm); "
                             "default every model.")
_OUTPUT = flags.DEFINE_string("output", None, "Results JSON (default workdir/eval/"
                              "results.<stage>.json).")


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


def main(argv: list[str]) -> None:
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if _WORKDIR.value is None:
    raise app.UsageError("--workdir is required: a directory made by python -m jbtx.train")
  try:
    config = from_mapping(ExperimentConfig, flags.FLAGS["config"].value)
    distributed.initialize(config.distributed)
    output = evaluate(config, pathlib.Path(_WORKDIR.value).absolute(), _STAGE.value,
                      pathlib.Path(_OUTPUT.value).absolute() if _OUTPUT.value else None)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"[eval] results in {output}")


def _workdir_argument(argv: list[str]) -> str | None:
  """The value of --workdir in `argv`, read before absl parses the flags (the config
  flag's defaults come from that workdir)."""
  for i, arg in enumerate(argv):
    if arg.startswith("--workdir="):
      return arg.split("=", 1)[1]
    if arg == "--workdir" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def run() -> None:
  workdir = _workdir_argument(sys.argv[1:])
  try:
    defaults = workdir_config(workdir) if workdir else ml_collections.ConfigDict()
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  config_flags.DEFINE_config_dict("config", defaults,
                                  "The workdir's experiment; override keys with --config.KEY=V.")
  app.run(main)


if __name__ == "__main__":
  run()

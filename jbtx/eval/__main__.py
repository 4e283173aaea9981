r"""`python -m jbtx.eval`: score the models of a workdir that `python -m jbtx.train` made.

    python -m jbtx.eval --workdir=runs/btx [--stage=finetune] [--output=FILE]
                        [--config.eval.tasks="('my_task.jsonl',)"] [--config.KEY=VALUE ...]

The experiment is the workdir's own (`config.json`, written by the training run), so
the models are evaluated as the pipeline's eval stage evaluates them, by the same
code (`jbtx.pipeline.stages.evaluation`): per-domain perplexity (dense, MoE and BTM ensembles),
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

import pathlib
import sys

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from jbtx.config import ConfigError, ExperimentConfig, check_overrides, from_mapping
from jbtx.pipeline.stages.evaluation import evaluate_workdir
from jbtx.pipeline.workdir import workdir_config
from jbtx.runtime import distributed

_WORKDIR = flags.DEFINE_string("workdir", None, "A workdir made by python -m jbtx.train.")
_STAGE = flags.DEFINE_string("stage", None, "One model (e.g. finetune, seed, math, btm); "
                             "default every model.")
_OUTPUT = flags.DEFINE_string("output", None, "Results JSON (default workdir/eval/"
                              "results.<stage>.json).")


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
    output = evaluate_workdir(config, pathlib.Path(_WORKDIR.value).absolute(), _STAGE.value,
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
    check_overrides(ExperimentConfig, sys.argv[1:])
    defaults = workdir_config(workdir) if workdir else ml_collections.ConfigDict()
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  config_flags.DEFINE_config_dict("config", defaults,
                                  "The workdir's experiment; override keys with --config.KEY=V.")
  app.run(main)


if __name__ == "__main__":
  run()

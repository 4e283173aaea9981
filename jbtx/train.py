r"""The jbtx command line: run an experiment's stages into a work directory.

    python -m jbtx.train --config=configs/btx.py [--workdir=DIR] [--config.KEY=VALUE ...]

Stages are idempotent: each publishes one jbtx checkpoint in `workdir/<stage>/`, a rerun
skips stages whose checkpoint is complete, and an interrupted stage resumes from its
latest checkpoint in `workdir/<stage>/checkpoints/`. SIGTERM or SIGINT during a stage
stops the run with exit status 0 at the next safe point: after the current training
step, saving a checkpoint, or before the final evaluation or the publish; a signal
during the publish lets it finish (a second signal interrupts at once).

The stages (`jbtx.pipeline.runner`, one module per kind in `jbtx.pipeline.stages`):
`seed` trains the dense seed (`config.model`; or `btx.seed_checkpoint` is used, and with
`btx.model_from_seed` the model's shape is read from it as the run starts), then
with `btx.experts` set, `expert/<domain>` for each expert, `mix`, `finetune`, the
baselines of `btx.baselines`, `eval` (results.json) and `export` (hf/).
`--config.btx.only=STAGE` runs one stage and exits (experts on separate hosts).

Multi-host: run the same command on every host; `config.distributed` (or the cluster
environment) makes the processes join one JAX job (`jbtx.runtime.distributed`).
"""

from __future__ import annotations

import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from jbtx.config import ConfigError, ExperimentConfig, exit_on_moved_overrides, from_mapping
from jbtx.interop import checkpoint
from jbtx.pipeline import runner
from jbtx.runtime import distributed, host_memory
from jbtx.runtime.distributed import log
from jbtx.runtime.signals import Preempted

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment file, e.g. configs/btx.py; override keys with --config.KEY=V.")
_WORKDIR = flags.DEFINE_string("workdir", None,
                               "Work directory (default: runs/<config file name>).")


def default_workdir(config_path: str) -> pathlib.Path:
  return pathlib.Path("runs") / pathlib.Path(config_path).stem


def main(argv: list[str]) -> None:
  if not flags.FLAGS["verbosity"].present:  # Orbax logs every save at INFO.
    logging.set_verbosity(logging.WARNING)
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if _CONFIG.value is None:
    raise app.UsageError("--config is required, e.g. --config=configs/btx.py")
  if _WORKDIR.value and "://" in _WORKDIR.value:
    raise app.UsageError(f"--workdir={_WORKDIR.value}: jbtx writes through the local file "
                         "system; mount the bucket (e.g. gcsfuse on every host) and pass "
                         "the mount's path")
  try:
    config = checkpoint.with_seed_model(from_mapping(ExperimentConfig, _CONFIG.value))
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if config.reuse_host_memory:  # Before JAX starts its threads.
    host_memory.reuse_freed_blocks()
  distributed.initialize(config.distributed)
  workdir = pathlib.Path(_WORKDIR.value
                         or default_workdir(flags.FLAGS["config"].config_filename)).absolute()
  try:
    runner.run(config, workdir)
  except Preempted as e:
    log(str(e))
  except ConfigError as e:  # A setting that only the devices or data can refute.
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def run() -> None:
  """Refuses moved keys with a clear error, then parses the flags and runs `main`."""
  exit_on_moved_overrides(ExperimentConfig, sys.argv[1:])
  app.run(main)


if __name__ == "__main__":
  run()

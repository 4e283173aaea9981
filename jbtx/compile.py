r"""`python -m jbtx.compile`: compile every stage's steps ahead of time, and check they fit.

    python -m jbtx.compile --config=configs/llama2_7b_btx.py:tpu_v5p_128 --topology=v5p-128
    python -m jbtx.compile --config=FILE[:variant] [--topology=v5p-8|v6e-256|v4-32|…]
        [--stages=finetune,expert/math,eval] [--device_memory_gib=80] [--margin=0.1]
        [--config.KEY=VALUE …]

Each training stage's step and each evaluated model's eval step is built as the run
builds it and compiled for the named TPU slice (compile-only devices from libtpu: no
TPU needed; `pip install -e ".[tpu]"`) or, without `--topology`, for this machine's
devices. Per step it prints the mesh, the parameters and optimizer state per device,
XLA's temporaries and total, the device's memory and the headroom, the collectives in
the compiled HLO and the FLOPs; then a summary. It exits 1 naming each step that does
not fit (with `--margin`, that leaves less than that fraction free), 2 for a bad config.
"""

from __future__ import annotations

import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from jbtx.config import ConfigError, ExperimentConfig, exit_on_moved_overrides, from_mapping
from jbtx.pipeline import compilation, registry
from jbtx.runtime import topologies
from jbtx.runtime.topologies import GiB

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment file, e.g. configs/llama2_7b_btx.py:tpu_v5p_128.")
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU slice to compile for, e.g. v5p-128, "
                                "v6e-256, v4-32 or v5p:4x4x4 (default: this machine's devices).")
_STAGES = flags.DEFINE_list("stages", [], "Stages to compile (default all; 'eval' for the "
                            "evaluation steps).")
_MEMORY = flags.DEFINE_float("device_memory_gib", None, "Memory per device to fit in, GiB "
                             "(default: the device kind's), e.g. 80 for an 80 GB GPU "
                             "compiled on a TPU slice of the same device count.")
_MARGIN = flags.DEFINE_float("margin", 0.0, "Fraction of the memory that must stay free.")


def main(argv: list[str]) -> None:
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if _CONFIG.value is None:
    raise app.UsageError("--config is required, e.g. --config=configs/llama2_7b_btx.py")
  try:
    config = from_mapping(ExperimentConfig, _CONFIG.value)
    registry.validate(config, files=False)  # compiling reads no checkpoint
    devices = (topologies.topology_devices(_TOPOLOGY.value) if _TOPOLOGY.value
               else jax.devices())
    jobs = compilation.compile_jobs(config, _STAGES.value)
  except (ConfigError, topologies.TopologyError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  memory = (int(_MEMORY.value * GiB) if _MEMORY.value
            else topologies.device_memory(devices[0]))
  reports = []
  for i, job in enumerate(jobs, 1):
    print(f"[compile] {i}/{len(jobs)} {job.label}: compiling for {len(devices)} "
          f"{devices[0].device_kind} devices …", flush=True)
    try:
      reports.append(compilation.compile_job(job, devices, memory))
    except ConfigError as e:
      print(f"error: {job.label}: {e}", file=sys.stderr)
      sys.exit(2)
    print(compilation.describe(reports[-1], devices), flush=True)
  print(compilation.summary(reports, _MARGIN.value))
  too_big = [r for r in reports if not r.fits(_MARGIN.value)]
  for r in too_big:
    print(f"error: {r.job.label} does not fit: {r.shortfall(_MARGIN.value)}", file=sys.stderr)
  if too_big:
    sys.exit(1)


def run() -> None:
  """Refuses moved keys with a clear error, then parses the flags and runs `main`."""
  exit_on_moved_overrides(ExperimentConfig, sys.argv[1:])
  app.run(main)


if __name__ == "__main__":
  run()

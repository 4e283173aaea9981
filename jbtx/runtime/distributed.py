"""Joining JAX's distributed runtime: one process per host (TPU pods, GPU clusters).

`initialize(config)` must run before anything touches a JAX backend. After it,
`jax.devices()` lists every device of the job, `jax.process_index()` names this
process, and jit'd computations over global arrays span all hosts. `log` prints on
process 0 only and `sync_processes` is a barrier of every process; both do the plain
thing with one process.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax
from jax.experimental import multihost_utils

from jbtx.config.distributed import DistributedConfig


def cluster_detected(environ: Mapping[str, str]) -> bool:
  """Whether `environ` describes a multi-process job that JAX can join by itself.

  Recognised: `JAX_COORDINATOR_ADDRESS`, SLURM with more than one task, Open MPI with
  more than one rank, and multi-host TPU slices (`TPU_WORKER_HOSTNAMES` with several
  hosts, as GKE and Cloud TPU set it).
  """
  if environ.get("JAX_COORDINATOR_ADDRESS"):
    return True
  for key in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    if int(environ.get(key, "1") or "1") > 1:
      return True
  return "," in environ.get("TPU_WORKER_HOSTNAMES", "")


def should_initialize(config: DistributedConfig, environ: Mapping[str, str]) -> bool:
  """Whether this run joins the distributed runtime (see `DistributedConfig.initialize`)."""
  if config.initialize != "auto":
    return config.initialize == "always"
  return config.coordinator_address is not None or cluster_detected(environ)


def initialize(config: DistributedConfig) -> None:
  """Calls `jax.distributed.initialize` when the config or environment asks for it.

  On CPU, cross-process collectives go through gloo. Values not set in `config` are
  auto-detected by JAX from the cluster environment.
  """
  if not should_initialize(config, os.environ):
    return
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=config.coordinator_address,
                             num_processes=config.num_processes,
                             process_id=config.process_id)


def log(message: str) -> None:
  """Prints on process 0 only."""
  if jax.process_index() == 0:
    print(message, flush=True)


def sync_processes(name: str) -> None:
  """Waits until every process reaches the barrier `name` (nothing with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)

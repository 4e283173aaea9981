"""Multi-process runs: how this process joins JAX's distributed runtime."""

from __future__ import annotations

import dataclasses
from typing import Literal

from jbtx.config.base import require as _require


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  """How to call `jax.distributed.initialize` (see `jbtx.runtime.distributed`).

  Attributes:
    initialize: "auto" joins when `coordinator_address` is set or the environment is
      a multi-process cluster (multi-host TPU, SLURM with several tasks, Open MPI,
      or `JAX_COORDINATOR_ADDRESS`); "always" joins (JAX auto-detects what is not
      set here); "never" runs as one process.
    coordinator_address: "host:port" of process 0 (default: auto-detected).
    num_processes: processes in the job (default: auto-detected).
    process_id: this process's index in [0, num_processes) (default: auto-detected).
  """

  initialize: Literal["auto", "always", "never"] = "auto"
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None

  def __post_init__(self):
    _require(self.num_processes is None or self.num_processes > 0, "num_processes",
             f"must be positive, got {self.num_processes}")
    _require(self.process_id is None or self.process_id >= 0, "process_id",
             f"must be non-negative, got {self.process_id}")
    if self.num_processes is not None and self.process_id is not None:
      _require(self.process_id < self.num_processes, "process_id",
               f"must be below num_processes ({self.num_processes}), got {self.process_id}")
    _require(self.coordinator_address is None or ":" in self.coordinator_address,
             "coordinator_address", f"must be host:port, got {self.coordinator_address!r}")

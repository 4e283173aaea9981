"""Compile-only devices of a named TPU slice, and each device kind's memory.

    devices = topology_devices("v5p-128")   # the 64 chips of a TPU v5p slice, no TPU needed
    device_memory(devices[0])                # 95 GiB of HBM

A program compiled for these devices with `jax.jit(...).lower(...).compile()` runs the
real TPU compiler, so its memory and collectives are those of the slice. Names follow
Cloud TPU's: `v5p-N` and `v4-N` count TensorCores (2 per chip), `v5e-N` and `v6e-N`
count chips; `v5p:4x4x4` names a chip shape directly. Needs libtpu
(`pip install -e ".[tpu]"`); without it `TopologyError` says so.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re

import jax
from jax.experimental import topologies

GiB = 2**30
# HBM per chip by `device_kind` (Cloud TPU's published sizes).
HBM_BYTES = {"TPU v4": 32 * GiB, "TPU v5": 95 * GiB, "TPU v5 lite": 16 * GiB,
             "TPU v6 lite": 32 * GiB}
# Chip shapes by chip count: 3D tori (v4, v5p) and 2D ones (v5e, v6e).
_SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4),
              128: (4, 4, 8), 256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16)}
_SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8),
              128: (8, 16), 256: (16, 16)}
_HOST_BOUNDS = (2, 2, 1)  # chips per host (a 4-chip host)
# Generation -> (TensorCores per chip in the slice's name, chip shapes, chip config).
_GENERATIONS = {"v4": (2, _SHAPES_3D, "megacore"), "v5p": (2, _SHAPES_3D, "default"),
                "v5e": (1, _SHAPES_2D, "default"), "v6e": (1, _SHAPES_2D, "default")}


class TopologyError(ValueError):
  """A topology name that names no slice, or no libtpu to compile for it."""


def topology_name(name: str) -> tuple[str, str]:
  """`(generation, "AxBxC")` of a slice name such as "v5p-128" or "v5p:4x4x4"."""
  if match := re.fullmatch(r"(v4|v5p|v5e|v6e):(\d+(?:x\d+)+)", name):
    return match.group(1), match.group(2)
  match = re.fullmatch(r"(v4|v5p|v5e|v6e)-(\d+)", name)
  if not match:
    raise TopologyError(f"unknown topology {name!r}: use a Cloud TPU slice name such as "
                        "v5p-128, v6e-256, v5e-16 or v4-32, or a chip shape such as v5p:4x4x4")
  generation, count = match.group(1), int(match.group(2))
  cores, shapes, _ = _GENERATIONS[generation]
  chips = count // cores
  if count % cores or chips not in shapes:
    raise TopologyError(f"{name}: no {generation} slice of {count} "
                        f"{'TensorCores' if cores > 1 else 'chips'}; known sizes: "
                        + ", ".join(f"{generation}-{c * cores}" for c in shapes))
  return generation, "x".join(map(str, shapes[chips]))


def topology_devices(name: str) -> list[jax.Device]:
  """The compile-only devices of the TPU slice `name`, one per chip (`topology_name`)."""
  generation, shape = topology_name(name)
  if importlib.util.find_spec("libtpu") is None:
    raise TopologyError(f"compiling for {name} needs libtpu: pip install -e \".[tpu]\" "
                        "(jax[tpu] of the pinned jax version)")
  dims = tuple(int(d) for d in shape.split("x"))
  # Compile-only: no chip is opened, so another process (a second compile, a test
  # worker) may hold libtpu too; off a TPU VM, libtpu would warn that it cannot find
  # the VM's accelerator type and workers.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", name if "-" in name else f"{generation}-8")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  description = topologies.get_topology_desc(
      platform="tpu", topology_name=f"{generation}:{shape}",
      chip_config_name=_GENERATIONS[generation][2], chips_per_host_bounds=_HOST_BOUNDS,
      num_slices=1)
  devices = list(description.devices)
  if len(devices) != math.prod(dims):
    raise TopologyError(f"{name}: libtpu gave {len(devices)} devices for {shape}")
  return devices


def device_memory(device: jax.Device) -> int | None:
  """Bytes of memory of `device`: what the runtime reports, else the kind's HBM."""
  try:
    stats = device.memory_stats()
  except Exception:  # compile-only devices have no runtime to ask
    stats = None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  return HBM_BYTES.get(device.device_kind)

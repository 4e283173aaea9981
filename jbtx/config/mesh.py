"""The device mesh: how many devices each parallelism axis spans."""

from __future__ import annotations

import dataclasses

from jbtx.config.base import require as _require

MESH_AXES = ("data", "fsdp", "expert", "tensor")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Sizes of the mesh axes ("data", "fsdp", "expert", "tensor"); see `jbtx.runtime.sharding`.

  Within a slice (ICI): `data` replicates parameters, `fsdp` shards them (and the
  batch), `expert` shards MoE experts (and the batch outside MoE layers), `tensor`
  shards hidden/head/vocab dimensions. Across slices or hosts (DCN, e.g. TPU
  multi-slice): `dcn_*` multiply the same axes; the mesh axis size is `ici * dcn`.
  One ICI size and one DCN size may be -1: "all the remaining devices".
  """

  data: int = -1
  fsdp: int = 1
  expert: int = 1
  tensor: int = 1
  dcn_data: int = 1
  dcn_fsdp: int = 1
  dcn_expert: int = 1
  dcn_tensor: int = 1

  def __post_init__(self):
    for prefix in ("", "dcn_"):
      keys = [prefix + axis for axis in MESH_AXES]
      for key in keys:
        value = getattr(self, key)
        _require(value == -1 or value > 0, key, f"must be positive or -1 (fill), got {value}")
      fills = [key for key in keys if getattr(self, key) == -1]
      _require(len(fills) <= 1, fills[-1] if fills else keys[0],
               f"only one of {', '.join(keys)} may be -1, got -1 for {', '.join(fills)}")

  def ici_sizes(self) -> tuple[int, ...]:
    """Sizes within a slice, in `MESH_AXES` order (-1 not yet filled)."""
    return tuple(getattr(self, axis) for axis in MESH_AXES)

  def dcn_sizes(self) -> tuple[int, ...]:
    """Sizes across slices, in `MESH_AXES` order (-1 not yet filled)."""
    return tuple(getattr(self, "dcn_" + axis) for axis in MESH_AXES)

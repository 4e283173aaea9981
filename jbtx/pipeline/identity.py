"""Stage identities: the part of the experiment a stage's output depends on.

Every stage directory records its identity in `stage.json` as a flat `{dotted key:
value}` dict (`flat_identity`); a run whose experiment gives another identity is
refused with the differing keys named (`differences`). Keys that only change how a
stage runs (logging, checkpoint cadence, mesh, processes) are left out.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import traverse_util

from jbtx.config import ExperimentConfig, to_dict

# Keys that change how a stage runs or reports, never what it computes.
_RUN_ONLY_KEYS = ("train.log_every", "train.checkpoint_every", "train.keep_last",
                  "train.keep_every", "train.async_checkpoints", "train.tensorboard",
                  "train.max_skipped_steps", "train.peak_flops_per_device",
                  "data.prefetch", "data.data_dir", "data.tfds_data_dir", "profile_steps",
                  "dump_hlo", "reuse_host_memory")
_RUN_ONLY_GROUPS = ("mesh.", "distributed.")
# The groups the training engine reads; a method's own group (btx, btm, upcycle, …)
# belongs to a training stage's identity only where that stage adds it.
_TRAINING_GROUPS = ("model", "seed", "data", "optimizer", "train", "mesh", "distributed",
                    "profile_steps", "dump_hlo", "reuse_host_memory")
UNSET = "<unset>"


def training(config: ExperimentConfig) -> dict[str, Any]:
  """A derived training stage's settings: what the training engine reads."""
  return {k: v for k, v in to_dict(config).items() if k in _TRAINING_GROUPS}


def plain(value: Any) -> Any:
  """`value` with config dataclasses (also inside dicts) as plain dicts."""
  if isinstance(value, dict):
    return {k: plain(v) for k, v in value.items()}
  return to_dict(value) if dataclasses.is_dataclass(value) else value


def flat_identity(tree: dict[str, Any]) -> dict[str, Any]:
  """A nested identity as `{dotted key: value}`, the run-only keys left out (an empty
  group stays as the value `{}`)."""
  flat = traverse_util.flatten_dict(tree, keep_empty_nodes=True, sep=".")
  return {k: {} if v is traverse_util.empty_node else v for k, v in flat.items()
          if not _run_only(k)}


def _run_only(key: str) -> bool:
  """Whether the dotted `key` (or its tail after a nested stage's prefix) is run-only."""
  parts = key.split(".")
  tails = (".".join(parts[i:]) for i in range(len(parts)))
  return any(t in _RUN_ONLY_KEYS or t.startswith(_RUN_ONLY_GROUPS) for t in tails)


def differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
  """The dotted keys whose values differ (or exist on one side only), sorted."""
  keys = set(recorded) | set(current)
  return sorted(k for k in keys if recorded.get(k, UNSET) != _json(current.get(k, UNSET)))


def _json(value: Any) -> Any:
  """`value` as it reads back from JSON (tuples become lists)."""
  if isinstance(value, tuple):
    return [_json(v) for v in value]
  return value

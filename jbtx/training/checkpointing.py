"""Resumable training checkpoints: an Orbax `CheckpointManager` per stage.

    <stage>/checkpoints/<step>/state/     the TrainState (params, opt_state, step, rng),
                                          each array written by the processes holding it
    <stage>/checkpoints/<step>/data/      the data iterator state, one JSON file per process
                                          (all are restored: any process count resumes)
    <stage>/checkpoints/<step>/record/    JSON facts of the run (e.g. the initial evaluation)

Orbax writes a step under a temporary name (`<step>.orbax-checkpoint-tmp-*`) and renames
it only when every item is complete, so a process killed mid-write leaves a directory
that is never listed as a step and is deleted at the next start. Saves run in the
background; old steps are deleted except the latest `keep_last` and every multiple of
`keep_every`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import pathlib
import re
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies

from jbtx.config import TrainConfig

_PROCESS_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json")


def _process_file(directory: epath.Path) -> epath.Path:
  return directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"


class ProcessJsonHandler(ocp.CheckpointHandler):
  """Saves a JSON-serialisable dict per process (each process's data iterator state);
  restores all of them, so a job with another number of processes can resume."""

  def save(self, directory: epath.Path, args: ProcessJsonSave) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    _process_file(directory).write_text(json.dumps(args.state))

  def restore(self, directory: epath.Path,
              args: ProcessJsonRestore | None = None) -> list[dict[str, Any]]:
    """The dicts of processes 0, 1, … of the job that saved.

    Raises:
      FileNotFoundError: if some process's file is missing or of another job size.
    """
    found = {}
    for path in directory.iterdir():
      match = _PROCESS_FILE.fullmatch(path.name)
      if match:
        found[int(match[1]), int(match[2])] = path
    counts = {count for _, count in found}
    expected = {(i, count) for count in counts for i in range(count)}
    if len(counts) != 1 or set(found) != expected:
      names = sorted(p.name for p in directory.iterdir())
      raise FileNotFoundError(f"{directory} should hold one process_<i>-of-<n>.json per "
                              f"process of the job that saved; found "
                              f"{', '.join(names) or 'nothing'}")
    return [json.loads(found[key].read_text()) for key in sorted(found)]

  def metadata(self, directory: epath.Path) -> None:
    return None


@ocp.args.register_with_handler(ProcessJsonHandler, for_save=True)
@dataclasses.dataclass
class ProcessJsonSave(ocp.args.CheckpointArgs):
  state: dict[str, Any]


@ocp.args.register_with_handler(ProcessJsonHandler, for_restore=True)
@dataclasses.dataclass
class ProcessJsonRestore(ocp.args.CheckpointArgs):
  pass


@dataclasses.dataclass(frozen=True)
class Restored:
  """What a checkpoint brings back: the train state, the data states of the processes
  that saved (in process order), the record."""

  step: int
  state: Any
  data_states: list[dict[str, Any]]
  record: dict[str, Any]


class TrainCheckpointer:
  """Saves and restores `(TrainState, data iterator state, record)` at training steps."""

  def __init__(self, directory: pathlib.Path, config: TrainConfig):
    keep: list[policies.PreservationPolicy] = [policies.LatestN(config.keep_last)]
    if config.keep_every:
      keep.append(policies.EveryNSteps(config.keep_every))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policies.AnyPreservationPolicy(keep),
        enable_async_checkpointing=config.async_checkpoints, cleanup_tmp_directories=True)
    self.directory = pathlib.Path(directory).absolute()
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    """The step of the newest complete checkpoint, or None."""
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict[str, Any],
           record: dict[str, Any]) -> None:
    """Starts writing step `step` (in the background when async); returns at once."""
    self._manager.save(step, force=True, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ProcessJsonSave(data_state),
        record=ocp.args.JsonSave(copy.deepcopy(record))))  # the loop appends to it

  def restore_latest(self, abstract_state: Any) -> Restored | None:
    """The newest complete checkpoint restored onto `abstract_state`'s shardings, or None.

    Args:
      abstract_state: the TrainState as `jax.ShapeDtypeStruct`s carrying shardings.
    """
    step = self.latest_step()
    if step is None:
      return None
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ProcessJsonRestore(),
        record=ocp.args.JsonRestore()))
    return Restored(step, restored.state, restored.data, restored.record)

  def close(self) -> None:
    """Waits for background writes to finish."""
    self._manager.wait_until_finished()
    self._manager.close()

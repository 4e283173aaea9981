"""jbtx checkpoint directories: a model config plus an Orbax parameter tree.

    DIR/jbtx.json   {"format": "jbtx", "version": 1, "kind": "llama", "model": {...}, ...}
    DIR/params/     Orbax checkpoint (v1 API, OCDBT) of the parameter pytree
    DIR/tokenizer.json, …   a converted model's tokenizer files, when its source had them

Directories are written under a temporary sibling name and renamed into place only
when complete, so an interrupted write never leaves a directory that looks finished.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import shutil
import uuid
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
from orbax.checkpoint import v1 as ocp

from jbtx import config as config_lib
from jbtx.config import ExperimentConfig, ModelConfig
from jbtx.models.llama import Llama, n_layer_groups, stack_layers, unstack_layers

CONFIG_FILE = "jbtx.json"
PARAMS_DIR = "params"
FORMAT = "jbtx"
VERSION = 1


class CheckpointError(ValueError):
  """A directory is not a complete jbtx checkpoint, or cannot be written."""


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[pathlib.Path]:
  """Yields a fresh temporary directory that becomes `path` when the block succeeds.

  Raises CheckpointError (before anything is written) if `path` exists and is not an
  empty directory; on failure inside the block the temporary directory is removed and
  `path` is left untouched.
  """
  path = pathlib.Path(path).absolute()
  if path.exists() and (not path.is_dir() or any(path.iterdir())):
    raise CheckpointError(f"output {path} already exists; choose a new path or remove it")
  tmp = path.with_name(f".{path.name}.partial-{uuid.uuid4().hex[:8]}")
  tmp.mkdir(parents=True)
  try:
    yield tmp
    if path.exists():
      path.rmdir()
    tmp.rename(path)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp)


def save(directory: str | os.PathLike, model_config: ModelConfig, params: Any,
         kind: str = "llama", extra: dict[str, Any] | None = None) -> pathlib.Path:
  """Writes `params` (numpy or jax arrays) and `model_config` as a jbtx checkpoint.

  Args:
    directory: the checkpoint directory to create (must not exist, or be empty).
    model_config: the model shape.
    params: the parameter pytree in the layout of `kind`'s model.
    kind: model family ("llama").
    extra: more JSON-serialisable facts to record (e.g. the conversion source).

  Returns:
    The absolute checkpoint path.
  """
  return save_parts(directory, model_config, [params], kind, extra)


def save_parts(directory: str | os.PathLike, model_config: ModelConfig, parts: Iterable[Any],
               kind: str = "llama", extra: dict[str, Any] | None = None,
               files: Iterable[pathlib.Path] = ()) -> pathlib.Path:
  """Like `save`, with the parameter tree given as disjoint parts that together form it,
  and `files` (e.g. a tokenizer's) copied into the directory.

  Each part (a nested dict holding some of the leaves) is written and released before
  the next is drawn from `parts`, so peak memory is about two parts, not the model
  (Orbax's partial saving). This is how conversion streams a model to disk. A part is
  written a leaf at a time: Orbax's write buffers (a copy and its compressed bytes) are
  then one tensor's, not the whole part's.
  """
  with atomic_directory(directory) as tmp:
    for part in parts:
      for leaf in _leaf_parts(part):
        ocp.partial.save(tmp / PARAMS_DIR, leaf)
      del part
    ocp.partial.finalize(tmp / PARAMS_DIR)
    for file in files:
      shutil.copyfile(file, tmp / file.name)
    write_record(tmp, model_config, kind, extra)
  return pathlib.Path(directory).absolute()


def _leaf_parts(tree: Any) -> Iterator[Any]:
  """`tree` (nested mappings) as one nested dict per leaf, `{"a": {"b": leaf}}`."""
  if not isinstance(tree, Mapping):
    yield tree
    return
  for key, value in tree.items():
    for leaf in _leaf_parts(value):
      yield {key: leaf}


def write_record(directory: str | os.PathLike, model_config: ModelConfig, kind: str = "llama",
                 extra: dict[str, Any] | None = None) -> None:
  """Writes `directory/jbtx.json`: format, version, model kind and config, and `extra`."""
  record = {"format": FORMAT, "version": VERSION, "kind": kind,
            "model": config_lib.to_dict(model_config), **(extra or {})}
  (pathlib.Path(directory) / CONFIG_FILE).write_text(json.dumps(record, indent=2) + "\n")


def read_record(directory: str | os.PathLike) -> dict[str, Any]:
  """The parsed `jbtx.json` of a checkpoint directory, validated."""
  path = pathlib.Path(directory).absolute() / CONFIG_FILE
  if not path.is_file():
    raise CheckpointError(f"{path.parent} is not a jbtx checkpoint: {CONFIG_FILE} is missing")
  try:
    record = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path}: not valid JSON ({e})") from None
  if record.get("format") != FORMAT or record.get("version") != VERSION:
    raise CheckpointError(f"{path}: expected format {FORMAT!r} version {VERSION}, got "
                          f"{record.get('format')!r} version {record.get('version')!r}")
  if not (path.parent / PARAMS_DIR).is_dir():
    raise CheckpointError(f"{path.parent}: the {PARAMS_DIR}/ directory is missing")
  return record


def load_config(directory: str | os.PathLike) -> ModelConfig:
  """The model config recorded in a checkpoint directory."""
  record = read_record(directory)
  try:
    return config_lib.from_mapping(ModelConfig, record["model"], "model")
  except config_lib.ConfigError as e:
    raise CheckpointError(f"{pathlib.Path(directory) / CONFIG_FILE}: {e}") from None


def params_metadata(directory: str | os.PathLike) -> Any:
  """The parameter tree of a checkpoint as Orbax metadata leaves (`.shape`, `.dtype`)."""
  read_record(directory)
  return ocp.metadata(pathlib.Path(directory).absolute() / PARAMS_DIR).metadata


def load_params(directory: str | os.PathLike, as_numpy: bool = False) -> Any:
  """The parameter tree of a checkpoint: jax arrays on the default device, or numpy."""
  metadata = params_metadata(directory)
  params_dir = pathlib.Path(directory).absolute() / PARAMS_DIR
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                        metadata)
  params = ocp.load(params_dir, target)
  return jax.tree.map(np.asarray, params) if as_numpy else params


def load_params_for(directory: str | os.PathLike, model_config: ModelConfig) -> Any:
  """The checkpoint's parameters as numpy arrays in the layout of `model_config`: its
  layers stacked (scanned) or unrolled as `model_config.scan_layers` says, whatever the
  layout they were saved in."""
  params = load_params(directory, as_numpy=True)
  scanned = "layers" in params
  if model_config.scan_layers and not scanned:
    return stack_layers(params, n_layer_groups(model_config))
  if scanned and not model_config.scan_layers:
    return unstack_layers(params)
  return params


def with_seed_model(config: ExperimentConfig) -> ExperimentConfig:
  """`config` with `model`'s shape read from `btx.seed_checkpoint` if
  `btx.model_from_seed` is set (the experiment is checked again with it).

  Raises:
    ConfigError: naming `btx.seed_checkpoint` if it is not a jbtx checkpoint.
  """
  if not config.btx.model_from_seed:
    return config
  try:
    seed = load_config(config.btx.seed_checkpoint)
  except CheckpointError as e:
    raise config_lib.ConfigError("btx.seed_checkpoint", str(e)) from None
  return dataclasses.replace(config, model=config.model.with_shape_of(seed))


def load(directory: str | os.PathLike) -> tuple[Llama, Any]:
  """`(model, params)` from any jbtx checkpoint directory.

  `model.apply({"params": params}, tokens)` maps int32 tokens `[batch, seq]` to float32
  logits `[batch, seq, vocab]`.
  """
  record = read_record(directory)
  if record["kind"] != "llama":
    raise CheckpointError(f"{directory}: unknown model kind {record['kind']!r}")
  return Llama(load_config(directory)), load_params(directory)

"""Reading a decoder's parameters one tensor, or one layer of a tensor, at a time.

A source presents any jbtx decoder the same way, whether its layers are scanned (one
`[layers, …]` leaf per tensor under "layers") or unrolled ("layers_{i}"):

    source.top_paths()    ("embed", "embedding"), ("final_norm", "scale"), …
    source.layer_paths()  ("attn", "q", "kernel"), …, ("mlp", "gate", "kernel"), …
    source.top(path)      one whole tensor
    source.layer(path, i) layer i of a per-layer tensor
    source.leaf_paths(), source.leaf(path)    every tensor as stored (layers stacked or not)

`CheckpointSource` reads a checkpoint on disk through TensorStore, so a layer of a
stacked kernel is read without building the whole model in memory; `TreeSource` wraps
a parameter tree already in memory (tests, small models).
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorstore as ts
from flax.traverse_util import flatten_dict

from jbtx.config import ModelConfig
from jbtx.interop import checkpoint

Path = tuple[str, ...]
LAYERS = "layers"


def _is_layer_key(key: str) -> bool:
  return key == LAYERS or (key.startswith(f"{LAYERS}_") and key[len(LAYERS) + 1:].isdigit())


class _Source:
  """Paths of a parameter tree's structure (nested dict of leaves)."""

  def __init__(self, config: ModelConfig, structure: Mapping[str, Any]):
    if config.moe is not None and config.moe.every != 1:
      raise ValueError("reading layer by layer needs one block per layer (moe.every = 1)")
    self.config = config
    self._paths = list(flatten_dict(dict(structure)))

  def leaf_paths(self) -> list[Path]:
    """Every stored tensor's path, in the layout it is stored in."""
    return list(self._paths)

  def top_paths(self) -> list[Path]:
    return [p for p in self._paths if not _is_layer_key(p[0])]

  def layer_paths(self) -> list[Path]:
    unit = LAYERS if self.config.scan_layers else f"{LAYERS}_0"
    return [p[1:] for p in self._paths if p[0] == unit]

  def _check_layer(self, index: int) -> None:
    if not 0 <= index < self.config.n_layers:
      raise IndexError(f"layer {index} of a {self.config.n_layers}-layer model")


class TreeSource(_Source):
  """A parameter tree in memory (numpy or jax arrays)."""

  def __init__(self, config: ModelConfig, params: Mapping[str, Any]):
    super().__init__(config, params)
    self._leaves = flatten_dict(dict(params))

  def top(self, path: Path) -> np.ndarray:
    return np.asarray(self._leaves[path])

  leaf = top

  def layer(self, path: Path, index: int) -> np.ndarray:
    self._check_layer(index)
    if self.config.scan_layers:
      return np.asarray(self._leaves[(LAYERS, *path)][index])
    return np.asarray(self._leaves[(f"{LAYERS}_{index}", *path)])


class CheckpointSource(_Source):
  """A jbtx checkpoint directory, read tensor by tensor (and layer by layer) from disk.

  Peak memory is the tensor being read: TensorStore decodes a stored chunk at a time,
  and Orbax stores each tensor as one chunk, so reading one layer of a stacked kernel
  decodes that kernel once (memory of one tensor, time of one tensor per layer read).
  """

  def __init__(self, directory: str | os.PathLike):
    self.directory = pathlib.Path(directory).absolute()
    config = checkpoint.load_config(self.directory)
    params_dir = self.directory / checkpoint.PARAMS_DIR
    super().__init__(config, checkpoint.params_metadata(self.directory))
    self._root = params_dir / "state"

  def _open(self, path: Path) -> ts.TensorStore:
    key = ".".join(path)
    spec = {"driver": "zarr3",
            "kvstore": {"driver": "ocdbt", "base": f"file://{self._root}", "path": f"{key}/"}}
    try:
      return ts.open(spec, open=True, read=True).result()
    except ValueError as e:
      raise checkpoint.CheckpointError(
          f"{self.directory}: cannot read tensor {'/'.join(path)}: {e}") from None

  def top(self, path: Path) -> np.ndarray:
    return self._open(path).read().result()

  leaf = top

  def layer(self, path: Path, index: int) -> np.ndarray:
    self._check_layer(index)
    if self.config.scan_layers:
      return self._open((LAYERS, *path))[index].read().result()
    return self._open((f"{LAYERS}_{index}", *path)).read().result()

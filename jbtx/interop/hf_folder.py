"""Hugging Face checkpoint folders (Llama, Qwen2, Mixtral, OLMoE): `config.json` plus
weights, and the tokenizer files that come with them.

Weights may be one `model.safetensors` / `pytorch_model.bin`, or shards listed in a
`model.safetensors.index.json` / `pytorch_model.bin.index.json` weight map. The
functions here pick the model family: from `model_type` on import, from the jbtx
config (dense: Llama or Qwen2, `hf_config`; MoE: `hf_moe_map.model_type`) on export.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Collection, Mapping
from typing import Any

import numpy as np

from jbtx.config import ModelConfig
from jbtx.interop import hf_config, hf_moe_map, hf_tensor_map
from jbtx.interop.hf_tensor_map import ConversionError, TensorMap
from jbtx.interop.tensor_files import TensorFileError, TensorReader, open_tensor_file

_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SINGLE = ("model.safetensors", "pytorch_model.bin")
MODEL_TYPES = (*hf_config.DENSE_TYPES, *hf_moe_map.MODEL_TYPES)
# A model's tokenizer (`jbtx.data.tokenizers` reads them): a conversion copies those present.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model")


def model_config_from_hf(hf: Mapping[str, Any], source: str) -> ModelConfig:
  """ModelConfig from an HF `config.json` dict of any supported `model_type`."""
  kind = hf.get("model_type")
  if kind in hf_config.DENSE_TYPES:
    return hf_config.model_config_from_hf(hf, source)
  if kind in hf_moe_map.MODEL_TYPES:
    return hf_moe_map.model_config_from_hf(hf, source)
  raise ConversionError(f"{source}: model_type {kind!r} is not supported (supported: "
                        f"{', '.join(MODEL_TYPES)})")


def tokenizer_files(directory: pathlib.Path) -> list[pathlib.Path]:
  """The tokenizer files (`TOKENIZER_FILES`) present in `directory`."""
  return [directory / name for name in TOKENIZER_FILES if (directory / name).is_file()]


def tensor_maps(cfg: ModelConfig, names: Collection[str] = ()) -> list[TensorMap]:
  """The HF tensors of `cfg`'s model family.

  Args:
    cfg: the model shape.
    names: the tensor names of the checkpoint being read, which tell the MoE expert
      layout (fused or per expert); empty for export (per expert).
  """
  if cfg.moe is None:
    return hf_tensor_map.tensor_maps(cfg)
  return hf_moe_map.tensor_maps(cfg, fused=hf_moe_map.is_fused(names))


def hf_config_from_model(cfg: ModelConfig, dtype: str) -> dict[str, Any]:
  """The HF `config.json` dict of `cfg`'s model family (Llama, Qwen2, Mixtral or OLMoE)."""
  if cfg.moe is None:
    return hf_config.hf_config_from_model(cfg, dtype)
  return hf_moe_map.hf_config_from_model(cfg, dtype)


class HFCheckpoint:
  """Read-only view of an HF checkpoint folder, tensor by tensor."""

  def __init__(self, directory: pathlib.Path):
    self.directory = directory
    config_path = directory / "config.json"
    try:
      self.hf_config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
      raise ConversionError(f"{config_path}: not valid JSON ({e})") from None
    self.model_config = model_config_from_hf(self.hf_config, str(config_path))
    self.readers: dict[str, TensorReader] = {}
    self._file_of: dict[str, str] = {}
    self.shapes: dict[str, tuple[int, ...]] = {}
    self._index_tensors(self._weight_files())

  def _weight_files(self) -> list[str]:
    for index_name in _INDEXES:
      index_path = self.directory / index_name
      if index_path.is_file():
        try:
          weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
          raise ConversionError(f"{index_path}: not a valid weight index ({e})") from None
        self._file_of = dict(weight_map)
        return sorted(set(weight_map.values()))
    for name in _SINGLE:
      if (self.directory / name).is_file():
        return [name]
    raise ConversionError(f"{self.directory}: config.json found but no weights "
                          f"({', '.join(_SINGLE + _INDEXES)})")

  def _index_tensors(self, files: list[str]) -> None:
    for file_name in files:
      path = self.directory / file_name
      if not path.is_file():
        raise ConversionError(f"{path}: listed in the weight index but missing")
      reader = self.readers[file_name] = open_tensor_file(path)
      for name, info in reader.infos().items():
        if name in self.shapes:
          raise ConversionError(f"{path}: tensor {name!r} also appears in "
                                f"{self._file_of[name]}")
        if self._file_of.get(name, file_name) != file_name:
          continue  # The index assigns this name to another file.
        self._file_of[name] = file_name
        self.shapes[name] = info.shape
    for name, file_name in self._file_of.items():
      if name not in self.shapes:
        raise ConversionError(f"{self.directory / file_name}: tensor {name!r} is listed in "
                              "the weight index but not in the file")

  def where(self, name: str) -> str:
    return str(self.directory / self._file_of.get(name, ""))

  def read(self, name: str) -> np.ndarray:
    try:
      return self.readers[self._file_of[name]].read(name)
    except TensorFileError as e:
      raise ConversionError(str(e)) from None

  def close(self) -> None:
    for reader in self.readers.values():
      reader.close()

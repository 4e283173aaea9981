"""Converting checkpoints between Llama-2 / Mixtral / OLMoE formats and jbtx.

    config = import_checkpoint("llama-2-7b", "ckpt/llama2-7b", dtype="bfloat16")
    export_checkpoint("runs/btx/finetune", "hf/btx")

`import_checkpoint` detects the source format (`open_source`): Meta's original
Llama-2 release (`params.json` + `consolidated.NN.pth` shards) or Hugging Face Llama,
Qwen2, Mixtral or OLMoE (`config.json` + safetensors or `pytorch_model*.bin`,
optionally sharded with an index; MoE experts per expert or fused). Tensors are
streamed one at a time into the jbtx parameter tree and each finished leaf is written
to disk at once, so peak memory stays at a few leaves, well under one copy of the
model. The source's tokenizer files (`hf_folder.TOKENIZER_FILES`) are copied along, so
a converted seed carries its tokenizer. `export_checkpoint` writes a jbtx model as an
HF folder (`config.json` + safetensors shards, and the checkpoint's tokenizer files)
that `transformers.AutoModelForCausalLM` loads: a dense model as Llama (Qwen2 with
q/k/v biases), an MoE model as OLMoE if it has QK norms, else as Mixtral. Outputs
appear atomically: an interrupted or failed conversion leaves nothing at the output
path.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil

import numpy as np
import tqdm

from jbtx.config import ModelConfig
from jbtx.interop import checkpoint, hf_folder, hf_tensor_map
from jbtx.interop.hf_folder import HFCheckpoint
from jbtx.interop.hf_tensor_map import ConversionError
from jbtx.interop.meta_llama import MetaCheckpoint
from jbtx.interop.tensor_files import TensorFileError, TensorInfo, write_safetensors
from jbtx.models.layers import dtype_of

DTYPES = ("float32", "bfloat16")
_SHARD_BYTES = 5 * 2**30


def open_source(source: str | pathlib.Path) -> MetaCheckpoint | HFCheckpoint:
  """Opens a checkpoint folder of either supported format, detected from its files."""
  directory = pathlib.Path(source)
  if not directory.is_dir():
    raise ConversionError(f"{directory}: no such directory")
  try:
    if (directory / "params.json").is_file():
      return MetaCheckpoint(directory)
    if (directory / "config.json").is_file():
      return HFCheckpoint(directory)
  except TensorFileError as e:
    raise ConversionError(str(e)) from None
  raise ConversionError(f"{directory}: unknown checkpoint format; expected params.json "
                        "(Meta Llama-2) or config.json (Hugging Face)")


def import_checkpoint(source: str | pathlib.Path, output: str | pathlib.Path,
                      dtype: str = "float32", scan_layers: bool = True,
                      show_progress: bool = True) -> ModelConfig:
  """Converts a Meta or HF checkpoint into a jbtx checkpoint at `output`.

  The saved model config has `param_dtype = dtype` and compute `dtype = dtype`.
  Returns that config.
  """
  if dtype not in DTYPES:
    raise ConversionError(f"dtype must be one of {DTYPES}, got {dtype!r}")
  src = open_source(source)
  try:
    cfg = dataclasses.replace(src.model_config, dtype=dtype, param_dtype=dtype,
                              scan_layers=scan_layers)
    maps = hf_folder.tensor_maps(cfg, src.shapes)
    shapes = hf_tensor_map.without_tied_head(cfg, src.shapes, src.read, src.where)
    hf_tensor_map.check_tensors(cfg, maps, shapes, src.where)
    fmt = "meta" if isinstance(src, MetaCheckpoint) else "hf"
    with tqdm.tqdm(total=len(maps), desc="import", unit="tensor",
                   disable=not show_progress) as bar:
      leaves = hf_tensor_map.import_leaves(cfg, maps, src.read, dtype_of(dtype),
                                      progress=lambda _: bar.update())
      checkpoint.save_parts(output, cfg, leaves, extra={
          "source": str(pathlib.Path(source).absolute()), "source_format": fmt},
          files=hf_folder.tokenizer_files(pathlib.Path(source)))
  finally:
    src.close()
  return cfg


def export_checkpoint(ckpt: str | pathlib.Path, output: str | pathlib.Path,
                      dtype: str | None = None, show_progress: bool = True,
                      max_shard_bytes: int = _SHARD_BYTES) -> pathlib.Path:
  """Writes the jbtx checkpoint `ckpt` as a Hugging Face folder at `output`."""
  cfg = checkpoint.load_config(ckpt)
  dtype = dtype or cfg.param_dtype
  if dtype not in DTYPES:
    raise ConversionError(f"dtype must be one of {DTYPES}, got {dtype!r}")
  hf_config = hf_folder.hf_config_from_model(cfg, dtype)  # Fails early if HF lacks a feature.
  np_dtype = dtype_of(dtype)
  params = checkpoint.load_params(ckpt, as_numpy=True)
  produce = {}
  infos = []
  for m, fn in hf_tensor_map.export_tensors(cfg, hf_folder.tensor_maps(cfg), params):
    produce[m.hf_name] = fn
    infos.append(TensorInfo(m.hf_name, m.hf_shape, np_dtype))
  shards = _plan_shards(infos, max_shard_bytes)
  with checkpoint.atomic_directory(output) as tmp, \
       tqdm.tqdm(total=len(infos), desc="export", unit="tensor", disable=not show_progress) as bar:

    def produce_one(name: str) -> np.ndarray:
      bar.update()
      return produce[name]().astype(np_dtype)

    for file_name, shard in shards.items():
      write_safetensors(tmp / file_name, shard, produce_one, metadata={"format": "pt"})
    if len(shards) > 1:
      index = {"metadata": {"total_size": sum(_nbytes(i) for i in infos)},
               "weight_map": {i.name: f for f, shard in shards.items() for i in shard}}
      (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    for file in hf_folder.tokenizer_files(pathlib.Path(ckpt)):
      shutil.copyfile(file, tmp / file.name)
  return pathlib.Path(output).absolute()


def _nbytes(info: TensorInfo) -> int:
  return int(np.prod(info.shape)) * info.dtype.itemsize


def _plan_shards(infos: list[TensorInfo], max_bytes: int) -> dict[str, list[TensorInfo]]:
  """Groups tensors, in order, into files of at most `max_bytes` (HF's naming)."""
  groups: list[list[TensorInfo]] = [[]]
  size = 0
  for info in infos:
    if groups[-1] and size + _nbytes(info) > max_bytes:
      groups.append([])
      size = 0
    groups[-1].append(info)
    size += _nbytes(info)
  if len(groups) == 1:
    return {"model.safetensors": groups[0]}
  n = len(groups)
  return {f"model-{i + 1:05d}-of-{n:05d}.safetensors": g for i, g in enumerate(groups)}

r"""Checkpoint conversion between Llama-2 / Mixtral / OLMoE formats and jbtx.

    python -m jbtx.convert import --source=DIR --output=DIR [--dtype=bfloat16]
    python -m jbtx.convert export --checkpoint=DIR --output=DIR [--dtype=bfloat16]

`import` detects the source format: Meta's original Llama-2 release (`params.json` +
`consolidated.NN.pth` shards) or Hugging Face Llama, Mixtral or OLMoE (`config.json` +
safetensors or `pytorch_model*.bin`, optionally sharded with an index; MoE experts
per expert or fused). Tensors are streamed one at a time into the jbtx parameter tree
and each finished leaf is written to disk at once, so peak memory stays at a few
leaves, well under one copy of the model. `export` writes a jbtx model as an HF folder
(`config.json` + safetensors shards) that `transformers.AutoModelForCausalLM` loads:
a dense model as Llama, an MoE model as OLMoE if it has QK norms, else as Mixtral.

Outputs appear atomically: an interrupted or failed conversion leaves nothing at
`--output`.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys

import numpy as np
import tqdm
from absl import app, flags, logging

from jbtx import checkpoint
from jbtx.config import ModelConfig
from jbtx.interop import hf_llama, llama_hf
from jbtx.interop.hf_llama import HFCheckpoint
from jbtx.interop.llama_hf import ConversionError
from jbtx.interop.meta_llama import MetaCheckpoint
from jbtx.interop.tensor_files import TensorFileError, TensorInfo, write_safetensors
from jbtx.models.layers import dtype_of

_DTYPES = ("float32", "bfloat16")
_SHARD_BYTES = 5 * 2**30

_SOURCE = flags.DEFINE_string("source", None,
                              "import: Meta Llama-2 or HF Llama / Mixtral / OLMoE folder.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "export: jbtx checkpoint folder.")
_OUTPUT = flags.DEFINE_string("output", None, "Folder to create (must not exist).")
_DTYPE = flags.DEFINE_enum("dtype", None, _DTYPES,
                           "Dtype of the written weights. Import default: float32; "
                           "export default: the checkpoint's parameter dtype.")
_SCAN_LAYERS = flags.DEFINE_boolean("scan_layers", True,
                                    "import: store layers stacked for nn.scan.")


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
  if dtype not in _DTYPES:
    raise ConversionError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
  src = open_source(source)
  try:
    cfg = dataclasses.replace(src.model_config, dtype=dtype, param_dtype=dtype,
                              scan_layers=scan_layers)
    maps = hf_llama.tensor_maps(cfg, src.shapes)
    llama_hf.check_tensors(cfg, maps, src.shapes, src.where)
    fmt = "meta" if isinstance(src, MetaCheckpoint) else "hf"
    with tqdm.tqdm(total=len(maps), desc="import", unit="tensor",
                   disable=not show_progress) as bar:
      leaves = llama_hf.import_leaves(cfg, maps, src.read, dtype_of(dtype),
                                      progress=lambda _: bar.update())
      checkpoint.save_parts(output, cfg, leaves, extra={
          "source": str(pathlib.Path(source).absolute()), "source_format": fmt})
  finally:
    src.close()
  return cfg


def export_checkpoint(ckpt: str | pathlib.Path, output: str | pathlib.Path,
                      dtype: str | None = None, show_progress: bool = True,
                      max_shard_bytes: int = _SHARD_BYTES) -> pathlib.Path:
  """Writes the jbtx checkpoint `ckpt` as a Hugging Face folder at `output`."""
  cfg = checkpoint.load_config(ckpt)
  dtype = dtype or cfg.param_dtype
  if dtype not in _DTYPES:
    raise ConversionError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
  hf_config = hf_llama.hf_config_from_model(cfg, dtype)  # Fails early if HF lacks a feature.
  np_dtype = dtype_of(dtype)
  params = checkpoint.load_params(ckpt, as_numpy=True)
  produce = {}
  infos = []
  for m, fn in llama_hf.export_tensors(cfg, hf_llama.tensor_maps(cfg), params):
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


def main(argv: list[str]) -> None:
  if not flags.FLAGS["verbosity"].present:  # Orbax logs every save at INFO.
    logging.set_verbosity(logging.WARNING)
  commands = ("import", "export")
  if len(argv) != 2 or argv[1] not in commands:
    raise app.UsageError(f"usage: python -m jbtx.convert {{{'|'.join(commands)}}} --flags")
  if not _OUTPUT.value:
    raise app.UsageError("--output is required")
  try:
    if argv[1] == "import":
      if not _SOURCE.value:
        raise app.UsageError("import needs --source")
      cfg = import_checkpoint(_SOURCE.value, _OUTPUT.value, _DTYPE.value or "float32",
                              _SCAN_LAYERS.value)
      print(f"wrote jbtx checkpoint {_OUTPUT.value}: {cfg.n_layers} layers, "
            f"d_model {cfg.d_model}, {cfg.num_params() / 1e6:.1f}M parameters, {cfg.dtype}")
    else:
      if not _CHECKPOINT.value:
        raise app.UsageError("export needs --checkpoint")
      path = export_checkpoint(_CHECKPOINT.value, _OUTPUT.value, _DTYPE.value)
      print(f"wrote Hugging Face checkpoint {path}")
  except (ConversionError, checkpoint.CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)

"""The BTX model as a Hugging Face Mixtral folder (`hf/`), when transformers can run it
(top-k softmax over the top-k logits, Mixtral's routing); otherwise a log line says why.
A converted seed's tokenizer files are copied along."""

from __future__ import annotations

import pathlib
import shutil
from typing import Any

import jax

from jbtx.config import ExperimentConfig
from jbtx.interop import checkpoint, conversion, hf_folder
from jbtx.interop.hf_tensor_map import ConversionError
from jbtx.pipeline import workdir
from jbtx.pipeline.registry import Stage, register
from jbtx.pipeline.stages.finetune import FINETUNE
from jbtx.pipeline.workdir import Paths
from jbtx.runtime.distributed import log
from jbtx.runtime.signals import StopSignal

EXPORT = "export"
HF_DIR = "hf"


@register
class Export(Stage):
  """`hf/`: the finetuned BTX model for `transformers.MixtralForCausalLM`."""

  name = EXPORT
  phase = 50

  def stages(self, config: ExperimentConfig) -> list[str]:
    btx = config.btx
    return [EXPORT] if btx.experts and btx.train_btx and btx.export else []

  def wanted(self, config: ExperimentConfig) -> list[str]:
    return self.stages(config)

  def inputs(self, config: ExperimentConfig, stage: str) -> list[str]:
    return [FINETUNE]

  def identity(self, config: ExperimentConfig, stage: str) -> dict[str, Any]:
    return {"finetune": workdir.stage_identity(config, FINETUNE)}

  def directory(self, workdir_path: pathlib.Path, stage: str) -> pathlib.Path:
    return workdir_path / HF_DIR

  def done(self, paths: Paths, stage: str) -> bool:
    return (paths.stage_dir(EXPORT) / "config.json").is_file()

  def run(self, config: ExperimentConfig, paths: Paths, stop: StopSignal, stage: str) -> None:
    """Writes the folder under a staging name and renames it into place when complete."""
    del stop  # Short; a signal stops the run after it.
    finetune = paths.stage_dir(FINETUNE)
    moe = checkpoint.load_config(finetune).moe
    if moe.routing != "topk" or not moe.renormalize:
      log(f"[export] skipped: routing {moe.routing!r} is not Mixtral's softmax over the "
          "top-k logits, so transformers could not run this model")
      return
    out = paths.stage_dir(EXPORT)
    if jax.process_index() == 0:
      staging = out.with_name(f".{out.name}.export")
      shutil.rmtree(staging, ignore_errors=True)
      try:
        conversion.export_checkpoint(finetune, staging, show_progress=False)
      except ConversionError as e:
        log(f"[export] skipped: {e}")
        return
      _copy_seed_tokenizer(config, staging)
      shutil.copy(workdir.stage_file(paths, EXPORT), staging / workdir.STAGE_FILE)
      shutil.rmtree(out)
      staging.rename(out)
    log(f"[export] wrote {out} (transformers.MixtralForCausalLM.from_pretrained)")


def _copy_seed_tokenizer(config: ExperimentConfig, folder: pathlib.Path) -> None:
  """The seed checkpoint's tokenizer files (a converted HF model carries them), so the
  exported folder loads with `AutoTokenizer` too."""
  if config.btx.seed_checkpoint:
    for file in hf_folder.tokenizer_files(pathlib.Path(config.btx.seed_checkpoint)):
      shutil.copyfile(file, folder / file.name)

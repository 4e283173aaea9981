"""Runs an experiment's stages into a work directory, skipping what is complete.

    workdir/seed/                 the dense seed (or btx.seed_checkpoint, not copied)
    workdir/expert/<domain>/      one dense expert per domain, trained from the seed
    workdir/mix/                  the mixed MoE checkpoint (layers unrolled)
    workdir/finetune/             the finetuned MoE: the BTX model
    workdir/upcycle/, dense/,     baselines with BTX's FLOPs (btx.baselines): from the seed,
      llama_moe/, olmoe/          or from scratch (olmoe, which also gets the seed's FLOPs)
    workdir/eval/, results.json   every model on every domain, the results table
    workdir/hf/                   the BTX model in Hugging Face Mixtral format

The stages, their order, inputs and outputs come from the registry
(`jbtx.pipeline.registry`, one module per kind in `jbtx.pipeline.stages`). Before
anything is written the experiment is checked (each kind's checks, `btx.only`, the
tokenizer) and a workdir made by another experiment is refused, with the keys named
(`jbtx.pipeline.workdir`). A complete stage is skipped; an interrupted training stage
resumes from its checkpoints, an interrupted mix or export starts again.
"""

from __future__ import annotations

import pathlib
import time

from jbtx.config import ConfigError, ExperimentConfig
from jbtx.data import loader
from jbtx.pipeline import registry, workdir
from jbtx.pipeline.workdir import Paths
from jbtx.runtime.distributed import log, sync_processes
from jbtx.runtime.signals import Preempted, StopSignal


def check_vocabulary(config: ExperimentConfig) -> None:
  """Raises ConfigError if the tokenizer has more ids than the model has embeddings."""
  vocab_size = loader.make_tokenizer(config.data).vocab_size
  if vocab_size > config.model.vocab_size:
    tokenizer = config.data.tokenizer
    raise ConfigError("model.vocab_size",
                      f"the {tokenizer.type} tokenizer {tokenizer.path} has {vocab_size} "
                      f"ids, more than the model's {config.model.vocab_size}")


class Progress:
  """One console line per stage start, skip and finish, with times and shares."""

  def __init__(self, names: list[str]):
    self._names, self._start, self._times = names, time.perf_counter(), {}

  def _position(self, stage: str) -> str:
    return f"{self._names.index(stage) + 1}/{len(self._names)}"

  def skip(self, stage: str, where: pathlib.Path) -> None:
    log(f"[btx] stage {self._position(stage)} {stage}: already complete ({where}); skipping")

  def begin(self, stage: str) -> float:
    log(f"[btx] stage {self._position(stage)} {stage}: starting "
        f"(run time so far {time.perf_counter() - self._start:.0f} s)")
    return time.perf_counter()

  def end(self, stage: str, began: float) -> None:
    self._times[stage] = time.perf_counter() - began
    total = time.perf_counter() - self._start
    log(f"[btx] stage {self._position(stage)} {stage}: done in {self._times[stage]:.1f} s "
        f"({self._times[stage] / total:.0%} of the run's {total:.0f} s so far)")

  def summary(self) -> None:
    total = time.perf_counter() - self._start
    if self._times:
      log(f"[btx] finished in {total:.0f} s: " + ", ".join(
          f"{s} {t:.0f} s ({t / total:.0%})" for s, t in self._times.items()))


def run(config: ExperimentConfig, workdir_path: pathlib.Path) -> None:
  """Runs every incomplete stage (or `btx.only`) in order into `workdir_path`."""
  registry.validate(config)
  check_vocabulary(config)
  paths = Paths(config, workdir_path)
  workdir.check_workdir(config, paths)
  workdir.rerun_changed(config, paths)
  workdir.write_config(config, workdir_path)
  names = registry.stage_names(config)
  selected = [config.btx.only] if config.btx.only else names
  progress = Progress(names)
  with StopSignal() as stop:
    for stage in selected:
      kind = registry.kind_of(config, stage)
      if paths.complete(stage):
        progress.skip(stage, kind.output(paths, stage))
        continue
      missing = [s for s in registry.inputs(config, stage) if not paths.complete(s)]
      if missing:
        raise ConfigError("btx.only", f"stage {stage} needs {', '.join(missing)} in "
                          f"{workdir_path} first: run them, or copy their directories there")
      began = progress.begin(stage)
      workdir.record_identity(config, paths, stage)
      kind.run(config, paths, stop, stage)
      sync_processes(f"jbtx stage {stage} {workdir_path}")  # process 0 writes mix, results, hf
      progress.end(stage, began)
      if stop.requested() and stage != selected[-1]:
        raise Preempted(stage)
  progress.summary()

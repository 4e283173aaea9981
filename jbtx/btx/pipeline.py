"""Runs the BTX stages into a work directory, skipping what is complete.

    workdir/seed/                 the dense seed (or btx.seed_checkpoint, not copied)
    workdir/expert/<domain>/      one dense expert per domain, trained from the seed
    workdir/mix/                  the mixed MoE checkpoint (layers unrolled)
    workdir/finetune/             the finetuned MoE: the BTX model
    workdir/upcycle/, dense/,     baselines with BTX's FLOPs (btx.baselines): from the seed,
      llama_moe/, olmoe/          or from scratch (olmoe, which also gets the seed's FLOPs)
    workdir/eval/, results.json   every model on every domain, the results table
    workdir/hf/                   the BTX model in Hugging Face Mixtral format

A workdir made by another experiment is refused before anything is written, with the
keys named (`jbtx.btx.workdir`). A stage is complete when its output exists
(`jbtx.json`, `results.json`, `hf/config.json`); an interrupted training stage resumes
from its checkpoints, an interrupted mix or export starts again.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
import time
from typing import Any

import jax
import numpy as np

from jbtx import checkpoint, convert
from jbtx.btx import cbtm, eval_stage, llama_moe, mix, router_init, stages
from jbtx.btx import workdir as workdir_lib
from jbtx.btx.sources import CheckpointSource
from jbtx.btx.upcycle import upcycle_params
from jbtx.btx.workdir import Paths
from jbtx.config import ConfigError, ExperimentConfig, to_dict
from jbtx.config.btx import SEED_EXPERT
from jbtx.data import pipeline as data_pipeline
from jbtx.interop.llama_hf import ConversionError
from jbtx.models.llama import Llama
from jbtx.training.guards import StopSignal
from jbtx.training.loop import Preempted, log, sync_processes, train_stage

_SHAPE_KEYS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff",
               "rope_theta", "norm_eps", "qk_norm", "moe")


def _seed_params(config: ExperimentConfig, paths: Paths):
  """`() -> the seed's parameters` in the layout of `config.model`."""
  return lambda: checkpoint.load_params_for(paths.model_dir(SEED_EXPERT), config.model)


def _check_seed_checkpoint(config: ExperimentConfig, paths: Paths) -> None:
  directory = paths.model_dir(SEED_EXPERT)
  try:
    loaded = checkpoint.load_config(directory)
  except checkpoint.CheckpointError as e:
    raise ConfigError("btx.seed_checkpoint", str(e)) from None
  for key in _SHAPE_KEYS:
    if getattr(loaded, key) != getattr(config.model, key):
      raise ConfigError(f"model.{key}", f"the seed checkpoint {directory} has "
                        f"{getattr(loaded, key)!r}, the config {getattr(config.model, key)!r}")


def run_seed(config: ExperimentConfig, paths: Paths, stop: StopSignal) -> None:
  train_stage(stages.seed_config(config), paths.stage_dir(stages.SEED), stages.SEED, stop)


def run_expert(config: ExperimentConfig, paths: Paths, stop: StopSignal, domain: str) -> None:
  stage = stages.expert_stage(domain)
  train_stage(stages.expert_config(config, domain), paths.stage_dir(stage), stage, stop,
              initial_params=_seed_params(config, paths))


def mixing_weights(config: ExperimentConfig) -> list[float]:
  """Averaging weights of the mixed models, in expert order (uniform by default)."""
  given = config.btx.mix_weights
  return [given.get(name, 0.0) if given else 1.0 for name in config.btx.expert_names]


def _routers(config: ExperimentConfig, paths: Paths, moe_config) -> Any:
  if config.btx.router_init == "random":
    return mix.random_routers(moe_config, config.seed)
  seed_dir = paths.model_dir(SEED_EXPERT)
  model = Llama(checkpoint.load_config(seed_dir))
  params = checkpoint.load_params(seed_dir)
  means = []
  for name in config.btx.expert_names:
    data = (config.data if name == SEED_EXPERT
            else stages.expert_config(config, name).data)
    batches = data_pipeline.train_iterator(data, seed=config.seed)
    try:
      means.append(router_init.mean_hidden(
          model, params, (next(batches) for _ in range(config.btx.router_init_batches))))
    finally:
      batches.close()
  kernels = router_init.hidden_routers(np.stack(means), moe_config.param_dtype)
  chunks = moe_config.moe.n_experts // len(means)  # split: a chunk takes its FFN's column
  return lambda layer: np.repeat(kernels[layer], chunks, axis=-1)


def run_mix(config: ExperimentConfig, paths: Paths, stop: StopSignal) -> None:
  """Builds the MoE checkpoint from the seed and the experts, one layer at a time."""
  del stop  # A mix is short and atomic: a signal stops the run after it.
  btx = config.btx
  names = btx.expert_names
  sources = [CheckpointSource(paths.model_dir(n)) for n in names]
  try:
    mix.check_compatible(sources, names)
  except ValueError as e:
    raise ConfigError("btx.experts", str(e)) from None
  moe_config = stages.moe_model_config(config)
  unrolled = dataclasses.replace(moe_config, scan_layers=False)
  weights = mixing_weights(config)
  out = paths.stage_dir(stages.MIX)
  if jax.process_index() == 0:
    staging = out / "model"
    for stale in [staging, out / checkpoint.PARAMS_DIR, *out.glob(".model.partial-*")]:
      if stale.exists():  # left by a killed mix
        shutil.rmtree(stale)
    parts = mix.mixed_parts(sources, unrolled, btx.ffn, btx.split_chunks, weights,
                            _routers(config, paths, moe_config))
    checkpoint.save_parts(staging, unrolled, parts, extra={
        "stage": stages.MIX, "experts": list(names), "weights": weights,
        "metrics": {"compute": {"tokens": 0, "flops": 0.0}}})
    (staging / checkpoint.PARAMS_DIR).rename(out / checkpoint.PARAMS_DIR)
    (staging / checkpoint.CONFIG_FILE).rename(out / checkpoint.CONFIG_FILE)  # complete
    staging.rmdir()


def _mix_params(config: ExperimentConfig, paths: Paths):
  finetune = stages.finetune_config(config)
  return lambda: checkpoint.load_params_for(paths.stage_dir(stages.MIX), finetune.model)


def run_finetune(config: ExperimentConfig, paths: Paths, stop: StopSignal) -> None:
  train_stage(stages.finetune_config(config), paths.stage_dir(stages.FINETUNE),
              stages.FINETUNE, stop, initial_params=_mix_params(config, paths))


def run_baseline(config: ExperimentConfig, paths: Paths, stop: StopSignal, name: str) -> None:
  """Trains baseline `name` with BTX's training FLOPs (`stages.baseline_config`): from
  the seed (upcycled, split or as it is), or from scratch (olmoe)."""
  seed_dir = paths.model_dir(SEED_EXPERT)
  reweights = name == stages.LLAMA_MOE and config.llama_moe.reweighting == "loss"
  derived = stages.baseline_config(
      config, name, references=llama_moe.reference_losses(seed_dir) if reweights else None)
  if name == stages.UPCYCLE:
    scanned = dataclasses.replace(config.model, scan_layers=True)
    initial = lambda: upcycle_params(checkpoint.load_params_for(seed_dir, scanned),
                                     derived.model, config.seed)
  elif name == stages.LLAMA_MOE:
    initial = lambda: llama_moe.initial_params(config, seed_dir)
  elif name == stages.OLMOE:
    initial = None  # from scratch
  else:
    initial = _seed_params(config, paths)
  train_stage(derived, paths.stage_dir(name), name, stop, initial_params=initial)


def run_clusters(config: ExperimentConfig, paths: Paths, stop: StopSignal) -> None:
  del stop  # Short; a signal stops the run after it.
  if jax.process_index() == 0:
    cbtm.write_clusters(config, paths.stage_dir(stages.CLUSTERS))


def run_cluster(config: ExperimentConfig, paths: Paths, stop: StopSignal, index: int) -> None:
  stage = stages.cluster_stage(index)
  derived = stages.cluster_config(config, index, paths.stage_dir(stages.CLUSTERS))
  train_stage(derived, paths.stage_dir(stage), stage, stop,
              initial_params=_seed_params(config, paths))


def run_export(config: ExperimentConfig, paths: Paths, stop: StopSignal) -> None:
  """Writes the BTX model as a Hugging Face Mixtral folder, or says why it cannot."""
  del stop
  finetune = paths.stage_dir(stages.FINETUNE)
  moe = checkpoint.load_config(finetune).moe
  if moe.routing != "topk" or not moe.renormalize:
    log(f"[export] skipped: routing {moe.routing!r} is not Mixtral's softmax over the top-k "
        "logits, so transformers could not run this model")
    return
  out = paths.stage_dir(stages.EXPORT)
  if jax.process_index() == 0:
    staging = out.with_name(f".{out.name}.export")
    shutil.rmtree(staging, ignore_errors=True)
    try:
      convert.export_checkpoint(finetune, staging, show_progress=False)
    except ConversionError as e:
      log(f"[export] skipped: {e}")
      return
    shutil.copy(workdir_lib.stage_file(paths, stages.EXPORT), staging / workdir_lib.STAGE_FILE)
    shutil.rmtree(out)
    staging.rename(out)
  log(f"[export] wrote {out} (transformers.MixtralForCausalLM.from_pretrained)")


RUNNERS = {stages.SEED: run_seed, stages.MIX: run_mix, stages.FINETUNE: run_finetune,
           stages.EVAL: eval_stage.run_eval, stages.EXPORT: run_export,
           stages.CLUSTERS: run_clusters,
           **{name: lambda *args, name=name: run_baseline(*args, name)
              for name in stages.TRAINED_BASELINES}}


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


def _inputs(config: ExperimentConfig, stage: str) -> list[str]:
  """The stages whose outputs `stage` reads."""
  experts = [stages.expert_stage(name) for name in config.btx.experts]
  if stage in (stages.SEED, stages.CLUSTERS):
    return []
  if stage == stages.OLMOE:
    return []
  if stage.startswith(stages.EXPERT_PREFIX) or stage in stages.TRAINED_BASELINES:
    return [stages.SEED]
  if stage.startswith(stages.CLUSTER_PREFIX):
    return [stages.SEED, stages.CLUSTERS]
  before_eval = [s for s in stages.stage_names(config) if s not in (stages.EVAL, stages.EXPORT)]
  return {stages.MIX: [stages.SEED, *experts], stages.FINETUNE: [stages.MIX],
          stages.EVAL: before_eval, stages.EXPORT: [stages.FINETUNE]}[stage]


def run(config: ExperimentConfig, workdir: pathlib.Path) -> None:
  """Runs every incomplete stage (or `btx.only`) in order into `workdir`."""
  paths = Paths(config, workdir)
  if config.btx.seed_checkpoint:
    _check_seed_checkpoint(config, paths)
  workdir_lib.check_workdir(config, paths)
  workdir_lib.evaluate_again(config, paths)
  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(json.dumps(to_dict(config), indent=2) + "\n")
  names = stages.stage_names(config)
  selected = [config.btx.only] if config.btx.only else names
  progress = Progress(names)
  with StopSignal() as stop:
    for stage in selected:
      if paths.complete(stage):
        progress.skip(stage, paths.model_dir(SEED_EXPERT) if stage == stages.SEED
                      else paths.stage_dir(stage))
        continue
      missing = [s for s in _inputs(config, stage) if not paths.complete(s)]
      if missing:
        raise ConfigError("btx.only", f"stage {stage} needs {', '.join(missing)} in "
                          f"{workdir} first: run them, or copy their directories there")
      began = progress.begin(stage)
      workdir_lib.record_identity(config, paths, stage)
      if stage.startswith(stages.EXPERT_PREFIX):
        run_expert(config, paths, stop, stage.removeprefix(stages.EXPERT_PREFIX))
      elif stage.startswith(stages.CLUSTER_PREFIX):
        run_cluster(config, paths, stop, int(stage.removeprefix(stages.CLUSTER_PREFIX)))
      else:
        RUNNERS[stage](config, paths, stop)
      sync_processes(f"jbtx stage {stage} {workdir}")  # process 0 writes mix, results, hf
      progress.end(stage, began)
      if stop.requested() and stage != selected[-1]:
        raise Preempted(stage)
  progress.summary()

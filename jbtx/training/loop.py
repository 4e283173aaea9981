"""The resumable training loop of one stage.

`train_stage(config, stage_dir, stage, stop)` trains `config.model` from a random init
(or from the latest resumable checkpoint under `stage_dir/checkpoints/`), then
evaluates, samples, and publishes the stage's jbtx checkpoint in `stage_dir`
(`jbtx.json` + `params/`). A stop signal (`guards.StopSignal`, held by the caller for
the whole run) ends the stage at the next safe point with `Preempted`: after the
current training step (saving a checkpoint), or before the final evaluation or the
publish once the last step's checkpoint is saved. A signal during the publish lets it
finish: the stage is then complete. Side outputs of the stage directory:

    checkpoints/<step>/   resumable Orbax checkpoints (`jbtx.training.checkpointing`)
    tensorboard/          event files, and profiler traces under plugins/profile/
    hlo/                  the train step's HLO when `dump_hlo` is set
"""

from __future__ import annotations

import pathlib
import shutil
from collections.abc import Callable, Mapping
from typing import Any

import jax
from jax.sharding import Mesh
from orbax.checkpoint import v1 as ocp_v1

from jbtx.config import ConfigError, ExperimentConfig, ModelConfig
from jbtx.config.training import profile_window
from jbtx.data import loader
from jbtx.interop import checkpoint
from jbtx.models.llama import Llama
from jbtx.runtime import sharding
from jbtx.runtime.distributed import log, sync_processes
from jbtx.runtime.signals import Preempted, StopSignal
from jbtx.training import metrics as metrics_lib
from jbtx.training.checkpointing import TrainCheckpointer
from jbtx.training.guards import SkipGuard
from jbtx.training.optimizer import make_optimizer
from jbtx.training.profiling import ProfileWindow, dump_hlo
from jbtx.training.reporting import Reporter
from jbtx.training.step import (
  TrainState,
  abstract_batch,
  abstract_train_state,
  init_train_state,
  make_eval_step,
  make_train_step,
  train_state_from_params,
)
from jbtx.training.validation import evaluate, sample_text

InitialParams = Callable[[], Any] | None

CHECKPOINTS_DIR = "checkpoints"
TENSORBOARD_DIR = "tensorboard"
HLO_DIR = "hlo"


def _rates(config: ExperimentConfig, summary: dict[str, Any]) -> dict[str, float | None]:
  """tokens/s (all tokens of the batches) and MFU of a window summary."""
  tokens = summary["steps"] * config.data.batch_size * config.data.seq_len
  rate = tokens / summary["seconds"]
  peak = metrics_lib.peak_flops(jax.devices()[0].device_kind,
                                config.train.peak_flops_per_device)
  flops = metrics_lib.train_flops_per_token(config.model, config.data.seq_len)
  return {"tokens_per_second": rate,
          "mfu": metrics_lib.mfu(rate, flops, jax.device_count(), peak)}


def curve_point(step: int, result: dict[str, Any]) -> dict[str, Any]:
  """A point of a stage's validation curve: the step, the loss (over all tokens) and
  each domain's."""
  return {"step": step, "loss": result["loss"], "domains": dict(result["domains"])}


def validate(config: ExperimentConfig, step: int, params: Any, data: Any, mesh: Mesh,
             eval_step: Any, reporter: Reporter) -> dict[str, Any]:
  """A validation pass during training; re-weights the data mixture if configured."""
  result = evaluate(params, config, mesh, eval_step)
  reporter.scalars("validation", step, {"loss": result["loss"]} | result["domains"])
  line = " ".join(f"{d} {v:.3f}" for d, v in result["domains"].items())
  reporter.write(f"[{reporter.stage}] step {step:5d}  validation loss {result['loss']:.4f}  "
                 f"({line})")
  if config.data.reweighting == "loss":
    weights = data.update_weights(result["domains"])
    reporter.scalars("data_weight", step, weights)
    reporter.write(f"[{reporter.stage}] domain weights "
                   + " ".join(f"{d} {w:.3f}" for d, w in weights.items()))
  return result


def run_steps(config: ExperimentConfig, stage_dir: pathlib.Path, stage: str, mesh: Mesh,
              steps_fns: tuple[Any, Any], state: TrainState, data: Any,
              checkpointer: TrainCheckpointer, record: dict[str, Any],
              stop: StopSignal) -> TrainState:
  """Runs the steps after `state.step` up to `train.steps`, checkpointing and logging.

  Args:
    steps_fns: `(train_step, eval_step)` from `make_train_step` / `make_eval_step`.
    data: the training iterator (`get_state`, `set_state`, `update_weights`).
    record: JSON facts saved with every checkpoint.
    stop: the run's stop signal, checked after every step.

  Raises:
    Preempted: after saving a checkpoint, when SIGTERM/SIGINT arrived.
    FloatingPointError: after `train.max_skipped_steps` non-finite steps in a row.
  """
  train_step, eval_step = steps_fns
  train, steps, start = config.train, config.train.steps, int(jax.device_get(state.step))
  logdir = stage_dir / TENSORBOARD_DIR
  profiler = ProfileWindow(profile_window(config.profile_steps), logdir)
  reporter = Reporter(stage, steps, start, logdir if train.tensorboard else None)
  guard = SkipGuard(train.max_skipped_steps, stage)
  window = metrics_lib.MetricWindow()
  pending = None  # The previous step's "skipped" flag, read once the next step is queued.
  try:
    for step in range(start + 1, steps + 1):
      profiler.before_step(step)
      state, metrics = train_step(state, sharding.global_batch(mesh, next(data)))
      if profiler.after_step(step, metrics):
        reporter.write(f"[{stage}] wrote a profile of steps {config.profile_steps} to {logdir}")
      if pending is not None:
        guard.update(pending[0], bool(pending[1]))
      pending = (step, metrics["skipped"])
      window.add(metrics)
      reporter.advance()
      if step % train.log_every == 0 or step == steps:
        summary = window.summary()
        reporter.train(step, summary, _rates(config, summary))
      if train.eval_every and step % train.eval_every == 0 and step < steps:
        result = validate(config, step, state.params, data, mesh, eval_step, reporter)
        record.setdefault("curve", []).append(curve_point(step, result))
      # With several processes the stop flag is agreed on by a collective, which waits
      # for the step to finish; do that only on log steps to keep dispatch ahead.
      stopping = ((jax.process_count() == 1 or step % train.log_every == 0)
                  and stop.requested())
      if step % train.checkpoint_every == 0 or step == steps or stopping:
        checkpointer.save(step, state, data.get_state(), record)
      if stopping:
        raise Preempted(stage, step)
    if pending is not None:
      guard.update(pending[0], bool(pending[1]))
  finally:
    profiler.stop(state)
    reporter.close()
  return state


def publish(stage_dir: pathlib.Path, model_config: ModelConfig, params: Any,
            extra: dict[str, Any]) -> None:
  """Writes the stage's jbtx checkpoint (`jbtx.json`, `params/`) into `stage_dir`.

  Every process writes the shards it holds of the (sharded) `params` into
  `stage_dir/final.partial/params` (Orbax); then process 0 writes `jbtx.json` there,
  moves `params/` into place and moves `jbtx.json`, which marks the stage complete, last.
  An interrupted publish leaves no `jbtx.json`; the rerun resumes from the final
  training checkpoint and publishes again.
  """
  stage_dir = stage_dir.absolute()  # Orbax writes only to absolute paths.
  staging = stage_dir / "final.partial"
  if jax.process_index() == 0:
    for stale in (staging, stage_dir / checkpoint.PARAMS_DIR):
      if stale.exists():
        shutil.rmtree(stale)
  sync_processes(f"jbtx publish start {stage_dir}")
  ocp_v1.partial.save(staging / checkpoint.PARAMS_DIR, params)
  ocp_v1.partial.finalize(staging / checkpoint.PARAMS_DIR)
  if jax.process_index() == 0:
    checkpoint.write_record(staging, model_config, extra=extra)
    (staging / checkpoint.PARAMS_DIR).rename(stage_dir / checkpoint.PARAMS_DIR)
    (staging / checkpoint.CONFIG_FILE).rename(stage_dir / checkpoint.CONFIG_FILE)
    staging.rmdir()
  sync_processes(f"jbtx publish end {stage_dir}")


def _start(config: ExperimentConfig, stage: str, model: Llama, optimizer: Any, mesh: Mesh,
           eval_step: Any, data: Any, checkpointer: TrainCheckpointer,
           initial_params: InitialParams) -> tuple[TrainState, dict[str, Any]]:
  """The train state and checkpoint record to continue from: restored, or fresh (from
  a random init, or from `initial_params()` with a fresh optimizer)."""
  restored = checkpointer.restore_latest(abstract_train_state(model, optimizer, mesh))
  if restored is not None:
    saved_by, path = len(restored.data_states), checkpointer.directory / str(restored.step)
    log(f"[{stage}] resuming from step {restored.step} ({path})"
        + (f", saved by {saved_by} processes" if saved_by != jax.process_count() else ""))
    try:
      data.set_state(loader.merge_states(restored.data_states))
    except ValueError as e:  # e.g. data.batch_size or the domains changed since the save
      raise ConfigError("data", f"cannot resume from {path}: {e}") from None
    return restored.state, restored.record
  log(f"[{stage}] {config.model.num_params() / 1e6:.2f}M parameters, "
      f"{config.train.steps} steps of {config.data.batch_size}x{config.data.seq_len} "
      f"tokens on {jax.device_count()} devices, mesh {dict(mesh.shape)}")
  if initial_params is None:
    state = init_train_state(model, optimizer, config.seed, mesh)
  else:
    state = train_state_from_params(model, optimizer, initial_params(), config.seed, mesh)
  return state, {"validation_before": evaluate(state.params, config, mesh, eval_step)}


def _stop_if_requested(stop: StopSignal, stage: str, state: TrainState) -> None:
  """Raises Preempted if `stop` was signalled (after training, whose end is saved)."""
  if stop.requested():
    raise Preempted(stage, int(jax.device_get(state.step)))


def train_stage(config: ExperimentConfig, stage_dir: pathlib.Path, stage: str,
                stop: StopSignal, initial_params: InitialParams = None,
                facts: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Trains `config.model` (resuming if possible) and publishes it as a jbtx checkpoint.

  Training starts from a random init, or from `initial_params()` (a parameter tree of
  `config.model`, called only when there is no checkpoint to resume). Returns the
  metrics that are also recorded in the checkpoint's `jbtx.json`: steps, validation
  before and after, the sample, and `facts` (e.g. the stage's training compute).

  Raises:
    Preempted: when `stop` was signalled before the publish began; the stage's latest
      checkpoint is saved (and complete) by then.
  """
  model = Llama(config.model)
  mesh = sharding.make_mesh(config.mesh)
  optimizer = make_optimizer(config.optimizer, config.train.steps)
  eval_step = make_eval_step(model, mesh, config.optimizer.grad_accum_steps)
  data = loader.train_iterator(config.data, seed=config.seed,
                                 process_index=jax.process_index(),
                                 process_count=jax.process_count())
  checkpointer = TrainCheckpointer(stage_dir / CHECKPOINTS_DIR, config.train)
  try:
    state, record = _start(config, stage, model, optimizer, mesh, eval_step, data,
                           checkpointer, initial_params)
    train_step = make_train_step(model, optimizer, mesh, config.optimizer.grad_accum_steps)
    if config.dump_hlo:
      paths = dump_hlo(train_step, (state, abstract_batch(config.data, mesh)),
                       stage_dir / HLO_DIR, "train_step")
      log(f"[{stage}] wrote {', '.join(map(str, paths))}")
    state = run_steps(config, stage_dir, stage, mesh, (train_step, eval_step), state, data,
                      checkpointer, record, stop)
  finally:
    data.close()
    checkpointer.close()  # Waits for the last step's checkpoint to be complete.
  _stop_if_requested(stop, stage, state)
  initial = record["validation_before"]
  final = evaluate(state.params, config, mesh, eval_step)
  sample = sample_text(model, state.params, config)
  _stop_if_requested(stop, stage, state)
  curve = [curve_point(0, initial), *record.get("curve", []),
           curve_point(config.train.steps, final)]
  result = {"steps": config.train.steps, "validation_before": initial, "validation": final,
            "curve": curve, "sample": sample, **(facts or {})}
  log(f"[{stage}] validation loss {initial['loss']:.3f} -> {final['loss']:.3f} nats/token "
      f"({final['bits_per_token']:.3f} bits/token, perplexity {final['perplexity']:.2f}); "
      + ", ".join(f"{d} {v:.3f}" for d, v in final["domains"].items()))
  log(f"[{stage}] sample: {sample!r}")
  publish(stage_dir, config.model, state.params, {"stage": stage, "metrics": result})
  log(f"[{stage}] wrote {stage_dir}")
  return result

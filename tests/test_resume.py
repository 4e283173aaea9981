"""Resumable training: kill -9, torn checkpoint writes, SIGTERM, and runs of skipped steps."""

import dataclasses
import os
import shutil
import signal
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import btx
from jbtx.config import ConfigError, ExperimentConfig, from_mapping
from jbtx.interop import checkpoint
from jbtx.runtime import sharding
from jbtx.runtime.signals import StopSignal
from jbtx.training import loop
from jbtx.training.checkpointing import TrainCheckpointer
from jbtx.training.step import TrainState
from tests.training_runs import (
  STEPS,
  final_params,
  run_env,  # noqa: F401 (fixture)
  train,
  train_command,
  uninterrupted_params,  # noqa: F401 (fixture)
  uninterrupted_run,  # noqa: F401 (fixture)
)


def _complete_steps(directory):
  """Steps Orbax lists as complete: directories named by the step alone."""
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def _start_and_wait_for_checkpoint(workdir, env, after):
  """Starts a run; returns it once a complete checkpoint newer than step `after` exists."""
  process = subprocess.Popen(train_command(workdir), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env=env)
  directory = workdir / "seed" / "checkpoints"
  deadline = time.monotonic() + 300
  while not [s for s in _complete_steps(directory) if s > after]:
    if process.poll() is not None or time.monotonic() > deadline:
      process.kill()
      pytest.fail(f"no checkpoint after step {after}:\n{process.communicate()[0]}")
    time.sleep(0.01)
  return process


def test_kill9_torn_write_and_sigterm_resume_to_the_uninterrupted_result(
    tmp_path, run_env, uninterrupted_params):  # noqa: F811 (fixtures)
  checkpoints = tmp_path / "seed" / "checkpoints"
  process = _start_and_wait_for_checkpoint(tmp_path, run_env, after=0)
  process.send_signal(signal.SIGKILL)
  process.wait()
  survived = _complete_steps(checkpoints)
  assert 0 < survived[-1] < STEPS and not (tmp_path / "seed" / checkpoint.CONFIG_FILE).exists()

  # A save killed midway, as Orbax leaves it: the step under its temporary name, with
  # only part of its files. It is newer than every complete step and must be ignored.
  torn = checkpoints / f"{STEPS - 1}.orbax-checkpoint-tmp-1700000000000000"
  shutil.copytree(checkpoints / str(survived[-1]), torn, dirs_exist_ok=True)
  shutil.rmtree(torn / "state")

  process = _start_and_wait_for_checkpoint(tmp_path, run_env, after=survived[-1])
  process.send_signal(signal.SIGTERM)
  output = process.communicate(timeout=300)[0]
  assert process.returncode == 0, output
  assert f"resuming from step {survived[-1]} " in output
  assert not torn.exists()  # Deleted at start-up, never restored.
  stopped = _complete_steps(checkpoints)[-1]
  assert survived[-1] < stopped < STEPS
  assert f"stopped by signal after step {stopped};" in output

  result = train(tmp_path, run_env)
  assert result.returncode == 0, result.stderr
  assert f"resuming from step {stopped} " in result.stdout
  equal = jax.tree.map(np.array_equal, final_params(tmp_path), uninterrupted_params)
  assert all(jax.tree.leaves(equal)), equal  # Bitwise, on CPU.


def test_a_run_logs_to_tensorboard_profiles_and_dumps_hlo(uninterrupted_run):  # noqa: F811
  seed = uninterrupted_run / "seed"
  output = (uninterrupted_run / "output.txt").read_text()
  assert "resuming" not in output and "MFU n/a" in output  # No peak FLOP/s known for CPU.
  assert "wrote a profile of steps 3,4" in output
  events = b"".join(p.read_bytes() for p in (seed / "tensorboard").glob("events.out.tfevents.*"))
  for tag in ("train/loss", "train/grad_norm", "train/learning_rate", "train/tokens_per_second"):
    assert tag.encode() in events
  (trace,) = (seed / "tensorboard" / "plugins" / "profile").iterdir()
  assert list(trace.glob("*.xplane.pb")) and list(trace.glob("*.trace.json.gz"))
  assert "HloModule" in (seed / "hlo" / "train_step.hlo.txt").read_text()
  assert "stablehlo" in (seed / "hlo" / "train_step.stablehlo.txt").read_text()
  steps = sorted(int(p.name) for p in (seed / "checkpoints").iterdir())
  assert steps == [STEPS - 5, STEPS]  # train.keep_last = 2


class _Batches:
  """Training batches `[8, 8]` of ones, with the iterator's state interface."""

  def __next__(self):
    return {k: np.ones((8, 8), np.int32) for k in ("tokens", "segment_ids", "positions")}

  def get_state(self):
    return {}


def test_consecutive_skipped_steps_stop_the_loop_with_a_clear_error(tmp_path):
  config = btx.get_config()
  config.train.update(steps=20, max_skipped_steps=3, tensorboard=False, log_every=50)
  config.data.update(batch_size=8, seq_len=8)
  config = from_mapping(ExperimentConfig, config)
  skipped = [0, 1, 1, 0, 1, 1, 1, 0]  # Step 7 ends the first run of three.
  ran = []

  def train_step(state, batch):  # Stands in for make_train_step's jit'd step.
    ran.append(int(state.step) + 1)
    return state.replace(step=state.step + 1), {"skipped": jnp.int32(skipped[int(state.step)])}

  state = TrainState(jnp.zeros((), jnp.int32), {}, (), jax.random.key(0))
  checkpointer = TrainCheckpointer(tmp_path, config.train)
  with pytest.raises(FloatingPointError, match=r"3 consecutive steps up to step 7 .*"
                     r"'train.max_skipped_steps' = 3.*stay as after step 4"):
    loop.run_steps(config, tmp_path, "test", sharding.make_mesh(config.mesh),
                   (train_step, None), state, _Batches(), checkpointer, {}, StopSignal())
  checkpointer.close()
  assert ran == list(range(1, 9))  # The check lags one step behind the queued step.


def _signal_during(function):
  """`function`, sending this process SIGTERM while it runs (as a preemption would)."""

  def signalled(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    return function(*args, **kwargs)

  return signalled


def test_signals_outside_the_steps_stop_at_the_next_safe_point(tmp_path, monkeypatch):
  config = btx.get_config()
  config.train.update(steps=3, checkpoint_every=100, log_every=1, eval_batches=1,
                      sample_tokens=0, tensorboard=False)
  config.data.update(batch_size=8, seq_len=16)
  config.model.update(n_layers=1)
  config.optimizer.update(warmup_steps=1)
  config = from_mapping(ExperimentConfig, config)
  checkpoints = tmp_path / "checkpoints"

  def run_stage(**patches):
    with monkeypatch.context() as patched, StopSignal() as stop:
      for name, function in patches.items():
        patched.setattr(loop, name, _signal_during(function))
      return loop.train_stage(config, tmp_path, "test", stop)

  # During the evaluation before training: the run stops after step 1, saving it.
  with pytest.raises(loop.Preempted, match="stopped by signal after step 1;"):
    run_stage(evaluate=loop.evaluate)
  assert _complete_steps(checkpoints) == [1]
  # A changed data config cannot continue the saved stream: a clear error, nothing lost.
  resized = dataclasses.replace(config, data=dataclasses.replace(config.data, batch_size=16))
  with pytest.raises(ConfigError, match=r"'data': cannot resume from .*checkpoints/1: data "
                     r"iterator state has batch_size 8, but this pipeline has 16"), \
      StopSignal() as stop:
    loop.train_stage(resized, tmp_path, "test", stop)
  assert _complete_steps(checkpoints) == [1]
  # During the final evaluation, once step 3 is saved: no publish.
  with pytest.raises(loop.Preempted, match="stopped by signal after step 3;"):
    run_stage(evaluate=loop.evaluate)
  assert _complete_steps(checkpoints) == [1, 3]
  assert not (tmp_path / checkpoint.CONFIG_FILE).exists()
  # During the publish: it finishes, and the stage is complete.
  result = run_stage(publish=loop.publish)
  assert result["steps"] == 3 and (tmp_path / checkpoint.CONFIG_FILE).exists()
  assert _complete_steps(checkpoints) == [1, 3]  # Nothing was trained again.
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # The handler is restored.

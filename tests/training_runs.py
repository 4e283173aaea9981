"""Training runs as `python -m jbtx.train` subprocesses, shared by the resume,
multi-process, CLI and notebook tests.

Runs use 4 simulated CPU devices per process and share a persistent compilation cache,
so only the first run of a program compiles it. `uninterrupted_run` is the reference,
made once per test session (its work directory is found again by name, since each
module importing the fixture gets its own instance of it). Under pytest-xdist the
workers share these runs and the cache: the first worker to need a run makes it while
the others wait on its lock.
"""

import contextlib
import fcntl
import os
import pathlib
import subprocess
import sys
from collections.abc import Iterator

import pytest

from jbtx.interop import checkpoint

STEPS = 40
DEVICES = 4
ARGS = (f"--config.train.steps={STEPS}", "--config.train.log_every=5",
        "--config.train.checkpoint_every=5", "--config.train.eval_batches=1",
        "--config.train.sample_tokens=0", "--config.optimizer.warmup_steps=2",
        "--config.data.batch_size=4", "--config.data.seq_len=32", "--config.model.n_layers=2",
        "--config.btx.only=seed", "--config.btx.seed_checkpoint=")  # trained here


# A short run of the demo configs on one device (the CLI and notebook tests).
SHORT_ARGS = ("--config.train.steps=6", "--config.train.log_every=3",
              "--config.train.eval_batches=1", "--config.optimizer.warmup_steps=2",
              "--config.data.batch_size=8", "--config.data.seq_len=64",
              "--config.model.n_layers=2", "--config.train.sample_tokens=8",
              "--config.btx.only=seed", "--config.btx.seed_checkpoint=")


def shared_temp(tmp_path_factory) -> pathlib.Path:
  """The session's temporary directory that every pytest-xdist worker sees."""
  base = tmp_path_factory.getbasetemp()
  return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@contextlib.contextmanager
def only_one_at_a_time(workdir: pathlib.Path) -> Iterator[None]:
  """Holds an exclusive lock next to `workdir` (other workers wait here)."""
  with open(workdir.parent / f"{workdir.name}.lock", "a") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def run_env(tmp_path_factory):
  """Environment of the subprocesses (devices per process, compilation cache)."""
  cache = shared_temp(tmp_path_factory) / "jax_cache"
  return os.environ | {"XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES}",
                       "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(cache),
                       "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                       "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def train_command(workdir, *extra) -> list[str]:
  return [sys.executable, "-m", "jbtx.train", "--config=configs/btx.py",
          f"--workdir={workdir}", *ARGS, *extra]


def train(workdir, env, *extra) -> subprocess.CompletedProcess:
  return subprocess.run(train_command(workdir, *extra), capture_output=True, text=True,
                        env=env, timeout=600)


def final_params(workdir):
  """The stage's published parameters as numpy arrays."""
  return checkpoint.load_params(workdir / "seed", as_numpy=True)


@pytest.fixture(scope="session")
def uninterrupted_run(tmp_path_factory, run_env):
  """Work directory of an uninterrupted run (also profiling steps 3-4 and dumping HLO,
  which change no number); its console output is in `output.txt` there."""
  workdir = shared_temp(tmp_path_factory) / "uninterrupted"
  with only_one_at_a_time(workdir):
    if not (workdir / "seed" / checkpoint.CONFIG_FILE).exists():
      result = train(workdir, run_env, "--config.profile_steps=3,4", "--config.dump_hlo=True")
      assert result.returncode == 0, result.stderr
      (workdir / "output.txt").write_text(result.stdout + result.stderr)
  return workdir


@pytest.fixture(scope="session")
def uninterrupted_params(uninterrupted_run):
  return final_params(uninterrupted_run)


@pytest.fixture(scope="session")
def moe_run(tmp_path_factory):
  """Work directory of a short `configs/olmoe_tiny.py` run (an MoE model trained from
  scratch); its console output is in `output.txt` there."""
  workdir = shared_temp(tmp_path_factory) / "olmoe_tiny"
  with only_one_at_a_time(workdir):
    if not (workdir / "seed" / checkpoint.CONFIG_FILE).exists():
      result = subprocess.run([sys.executable, "-m", "jbtx.train",
                               "--config=configs/olmoe_tiny.py", f"--workdir={workdir}",
                               *SHORT_ARGS], capture_output=True, text=True, timeout=600)
      assert result.returncode == 0, result.stderr
      (workdir / "output.txt").write_text(result.stdout + result.stderr)
  return workdir


# The BTX pipeline shrunk (tests/btx_short.py): seed, expert/code, expert/math, mix,
# finetune, eval, export.
def btx_command(workdir, *extra) -> list[str]:
  return [sys.executable, "-m", "jbtx.train", "--config=tests/btx_short.py",
          f"--workdir={workdir}", *extra]


def btx(workdir, env, *extra) -> subprocess.CompletedProcess:
  return subprocess.run(btx_command(workdir, *extra), capture_output=True, text=True, env=env,
                        timeout=900)


@pytest.fixture(scope="session")
def btx_run(tmp_path_factory, run_env):
  """Work directory of an uninterrupted shortened BTX pipeline; its console output is
  in `output.txt` there."""
  workdir = shared_temp(tmp_path_factory) / "btx"
  with only_one_at_a_time(workdir):
    if not (workdir / "results.json").exists():
      result = btx(workdir, run_env)
      assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
      (workdir / "output.txt").write_text(result.stdout + result.stderr)
  return workdir

"""Two processes on localhost (`jax.distributed`, gloo CPU collectives, 2 devices each)
train together on a hybrid mesh (data split over the processes as over DCN) and agree
with one process on 4 devices, which can also resume them."""

import shutil
import socket
import subprocess

import jax
import numpy as np

from jbtx.interop import checkpoint
from tests.training_runs import (
    final_params,
    run_env,  # noqa: F401 (fixture)
    train,
    train_command,
    uninterrupted_params,  # noqa: F401 (fixture)
    uninterrupted_run,  # noqa: F401 (fixture)
)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path, run_env, uninterrupted_params):  # noqa: F811
  env = run_env | {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  address = f"localhost:{_free_port()}"
  processes = [
      subprocess.Popen(
          train_command(tmp_path, f"--config.distributed.coordinator_address={address}",
                        "--config.distributed.num_processes=2",
                        f"--config.distributed.process_id={i}",
                        "--config.mesh.dcn_data=2"),  # A hybrid mesh: data = 2 (DCN) x 2
          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
      for i in range(2)]
  outputs = [p.communicate(timeout=300)[0] for p in processes]
  for p, output in zip(processes, outputs, strict=True):
    assert p.returncode == 0, output
  assert "on 4 devices, mesh {'data': 4," in outputs[0] and "[seed] step    40" in outputs[0]
  assert "[seed] step" not in outputs[1]  # Only process 0 reports.
  assert sorted(p.name for p in (tmp_path / "seed" / "checkpoints" / "40" / "data").iterdir()
                if p.suffix == ".json") == ["process_0-of-2.json", "process_1-of-2.json"]

  # Same batches and steps; only the order of the cross-process gradient sums differs.
  assert _max_difference(final_params(tmp_path), uninterrupted_params) < 1e-5  # Measured: 7e-7.

  # One process resumes what two saved: back to step 35, without the published result.
  seed = tmp_path / "seed"
  for published in (seed / checkpoint.CONFIG_FILE, seed / checkpoint.PARAMS_DIR,
                    seed / "checkpoints" / "40"):
    if published.is_dir():
      shutil.rmtree(published)
    else:
      published.unlink()
  result = train(tmp_path, run_env)
  assert result.returncode == 0, result.stderr
  assert "resuming from step 35 " in result.stdout
  assert ", saved by 2 processes" in result.stdout
  assert _max_difference(final_params(tmp_path), uninterrupted_params) < 1e-5


def _max_difference(params, reference) -> float:
  diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), params, reference)
  return max(jax.tree.leaves(diffs))

"""Pure pieces of the training engine: FLOPs and MFU, config checks, cluster detection,
log lines, and the checkpoint manager's retention and per-process data state."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath

from configs import btx
from jbtx.config import ConfigError, ExperimentConfig, TrainConfig, from_mapping
from jbtx.config.distributed import DistributedConfig
from jbtx.models import presets
from jbtx.runtime.distributed import cluster_detected, should_initialize
from jbtx.training import metrics
from jbtx.training.checkpointing import ProcessJsonHandler, TrainCheckpointer
from jbtx.training.reporting import format_line


def test_flops_per_token_counts_active_matmul_parameters_and_causal_attention():
  dense = presets.get("tiny")
  params = dense.num_params() - dense.vocab_size * dense.d_model
  attention = 6 * dense.n_layers * 256 * dense.n_heads * dense.head_dim
  assert metrics.train_flops_per_token(dense, 256) == 6 * params + attention
  moe = presets.get("tiny_moe")  # Only k of the E experts count.
  assert (metrics.train_flops_per_token(moe, 256)
          < 6 * (moe.num_params() - moe.vocab_size * moe.d_model) + attention)


def test_peak_flops_and_mfu():
  assert metrics.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
  assert metrics.peak_flops("TPU v5 lite") == 197e12  # Not v5p's 459e12.
  assert metrics.peak_flops("cpu") is None
  assert metrics.peak_flops("cpu", configured=1e12) == 1e12
  assert metrics.mfu(1000.0, 1e9, 2, 1e12) == pytest.approx(0.5)
  assert metrics.mfu(1000.0, 1e9, 2, None) is None


def test_log_line_reports_mfu_or_na_and_skipped_steps():
  summary = {"loss": 2.5, "grad_norm": 0.5, "learning_rate": 1e-3, "skipped": 2.0,
             "aux_loss": 0.01, "expert_load": np.array([[0.1, 0.4], [0.25, 0.25]])}
  line = format_line("seed", 7, summary, {"tokens_per_second": 1234.0, "mfu": None})
  assert "MFU n/a" in line and "skipped 2" in line and "expert load 0.100-0.400" in line
  line = format_line("seed", 7, summary | {"skipped": 0.0},
                     {"tokens_per_second": 1234.0, "mfu": 0.412})
  assert "MFU 41.2%" in line and "skipped" not in line and "1,234 tokens/s" in line


@pytest.mark.parametrize(("value", "message"), [
    ("10", "FIRST,LAST"), ("5,3", "1 <= FIRST <= LAST"), ("0,2", "1 <= FIRST <= LAST"),
    ("10,400", "ends after train.steps (200)")])
def test_bad_profile_steps_name_the_key(value, message):
  config = btx.get_config()
  config.profile_steps = value
  with pytest.raises(ConfigError, match="'profile_steps'") as error:
    from_mapping(ExperimentConfig, config)
  assert message in str(error.value)


def test_cluster_detection_from_the_environment():
  assert not cluster_detected({})
  assert not cluster_detected({"SLURM_NTASKS": "1", "TPU_WORKER_HOSTNAMES": "localhost"})
  assert cluster_detected({"SLURM_NTASKS": "16"})
  assert cluster_detected({"OMPI_COMM_WORLD_SIZE": "2"})
  assert cluster_detected({"TPU_WORKER_HOSTNAMES": "t1-w-0,t1-w-1"})
  assert should_initialize(DistributedConfig(coordinator_address="h:1"), {})
  assert not should_initialize(DistributedConfig(initialize="never"), {"SLURM_NTASKS": "4"})
  assert should_initialize(DistributedConfig(initialize="always"), {})
  with pytest.raises(ConfigError, match="'process_id': must be below num_processes"):
    DistributedConfig(num_processes=2, process_id=2)


def test_checkpointer_keeps_latest_and_every_kth_and_restores_data_state(tmp_path):
  state = {"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.int32(0), "rng": jax.random.key(3)}
  checkpointer = TrainCheckpointer(tmp_path, TrainConfig(keep_last=2, keep_every=4,
                                                         async_checkpoints=False))
  for step in range(1, 10):
    checkpointer.save(step, state | {"step": jnp.int32(step)}, {"position": step},
                      {"note": "x"})
  checkpointer.close()
  assert sorted(int(p.name) for p in tmp_path.iterdir()) == [4, 8, 9]
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state)
  restored = TrainCheckpointer(tmp_path, TrainConfig()).restore_latest(abstract)
  assert restored.step == 9 and int(restored.state["step"]) == 9
  assert restored.data_states == [{"position": 9}] and restored.record == {"note": "x"}
  np.testing.assert_array_equal(restored.state["w"], state["w"])
  assert (jax.random.key_data(restored.state["rng"]) == jax.random.key_data(state["rng"])).all()
  assert TrainCheckpointer(tmp_path / "empty", TrainConfig()).restore_latest(abstract) is None


def test_data_states_of_every_process_are_restored(tmp_path):
  for i in (1, 0):
    (tmp_path / f"process_{i}-of-2.json").write_text(json.dumps({"lane": i}))
  handler = ProcessJsonHandler()
  assert handler.restore(epath.Path(tmp_path)) == [{"lane": 0}, {"lane": 1}]
  (tmp_path / "process_1-of-2.json").unlink()
  with pytest.raises(FileNotFoundError, match=r"one process_<i>-of-<n>.json per process "
                     r"of the job that saved; found process_0-of-2.json$"):
    handler.restore(epath.Path(tmp_path))


def test_publish_into_a_relative_stage_directory(tmp_path, monkeypatch):
  """The default work directory, runs/<config>, is relative; Orbax needs absolute paths."""
  import jbtx
  from jbtx.models.llama import Llama, init_params
  from jbtx.training.loop import publish

  config = presets.get("micro")
  params = init_params(Llama(config), jax.random.key(0))
  monkeypatch.chdir(tmp_path)
  (tmp_path / "runs").mkdir()
  publish(pathlib.Path("runs/seed"), config, params, {"stage": "seed"})
  model, loaded = jbtx.load(tmp_path / "runs" / "seed")
  assert model.config == config
  jax.tree.map(np.testing.assert_array_equal, loaded, params)

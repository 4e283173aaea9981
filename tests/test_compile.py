"""Ahead-of-time compilation for a real TPU slice on this CPU machine (libtpu's
compile-only devices): the steps compile as the stages build them, the memory
analysis is there, the expected collectives appear, and `python -m jbtx.compile`
names a stage that does not fit."""

import dataclasses
import subprocess
import sys

import pytest

from jbtx.config import ExperimentConfig, MeshConfig, from_mapping
from jbtx.models import presets
from jbtx.pipeline import compilation, experiments
from jbtx.runtime import topologies
from jbtx.runtime.topologies import GiB
from jbtx.training.compilation import compile_train_step
from tests import btx_short


@pytest.fixture(scope="module")
def v5p_8():
  return topologies.topology_devices("v5p-8")  # 4 chips


def _finetune(mesh: MeshConfig, **moe) -> ExperimentConfig:
  """The shortened BTX finetune with 4 experts (3 domains and the seed) on `mesh`."""
  raw = btx_short.get_config()
  raw.btx.experts.knowledge = dict(raw.btx.experts.code)
  raw.mesh.update(dataclasses.asdict(mesh))
  config = experiments.finetune_config(from_mapping(ExperimentConfig, raw))
  model = dataclasses.replace(config.model, moe=dataclasses.replace(config.model.moe, **moe))
  return dataclasses.replace(config, model=model)


def test_slice_names_give_their_chips_and_memory(v5p_8):
  assert topologies.topology_name("v5p-128") == ("v5p", "4x4x4")
  assert topologies.topology_name("v6e-256") == ("v6e", "16x16")
  assert topologies.topology_name("v4-32") == ("v4", "2x2x4")
  assert topologies.topology_name("v5p:2x2x2") == ("v5p", "2x2x2")
  with pytest.raises(topologies.TopologyError, match="no v5p slice of 12 TensorCores"):
    topologies.topology_name("v5p-12")
  with pytest.raises(topologies.TopologyError, match="unknown topology 'h100-8'"):
    topologies.topology_name("h100-8")
  assert len(v5p_8) == 4 and v5p_8[0].platform == "tpu"
  assert topologies.device_memory(v5p_8[0]) == 95 * GiB


def test_expert_parallel_moe_compiles_with_all_to_alls(v5p_8):
  """The finetune's MoE with experts over the expert axis: the shard_map dispatch (the
  TPU path is the dropless one) exchanges tokens with all-to-alls that the dense
  dispatch on the same mesh does not have."""
  mesh = MeshConfig(data=1, expert=4)
  cost = compile_train_step(_finetune(mesh), v5p_8)
  dense = compile_train_step(_finetune(mesh, dispatch="dense"), v5p_8)
  assert cost.collectives["all-to-all"] >= dense.collectives.get("all-to-all", 0) + 4
  assert cost.temp_bytes > 0 and cost.argument_bytes >= cost.state_bytes > 0
  assert cost.alias_bytes > 0  # the donated train state
  assert cost.xla_flops > 0 and cost.model_flops > 0


def test_fsdp_gathers_weights_and_reduces_gradients(v5p_8):
  cost = compile_train_step(_finetune(MeshConfig(data=1, fsdp=4), dispatch="dense"), v5p_8)
  assert cost.collectives.get("all-gather", 0) > 0  # FSDP: weights gathered per layer
  reductions = cost.collectives.get("reduce-scatter", 0) + cost.collectives.get("all-reduce", 0)
  assert reductions > 0  # gradients reduced over the batch shards


def test_the_state_is_split_over_every_sharding_axis(v5p_8):
  """fsdp × expert shard every parameter and moment: 4 devices hold a quarter each."""
  config = _finetune(MeshConfig(data=1, fsdp=2, expert=2))
  replicated = _finetune(MeshConfig(data=4))
  sharded, whole = (compile_train_step(c, v5p_8).state_bytes for c in (config, replicated))
  assert sharded <= whole / 4 * 1.05  # norms and routers are too small to split evenly


def test_jobs_cover_every_training_stage_and_the_evaluation():
  raw = btx_short.get_config()
  raw.btx.update(baselines=("upcycle", "btm"), router_init="hidden")
  config = from_mapping(ExperimentConfig, raw)
  jobs = compilation.compile_jobs(config)
  labels = [job.label for job in jobs]
  assert labels[0] == "seed, expert/code, expert/math (train step)"
  assert "finetune (train step)" in labels and "upcycle (train step)" in labels
  assert "finetune, eval:finetune (eval step)" in labels  # its validation and the eval's
  assert "mix (router init)" in labels and "eval:btm (ensemble generation)" in labels
  assert any(label.endswith("(generation)") for label in labels)
  assert [job.label for job in compilation.compile_jobs(config, ["finetune"])] == [
      "finetune (train step)", "finetune (eval step)"]
  with pytest.raises(ValueError, match="not stages of this experiment: mixx"):
    compilation.compile_jobs(config, ["mixx"])


def _compile_cli(*flags: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "jbtx.compile", "--config=tests/btx_short.py",
                         *flags], capture_output=True, text=True, timeout=600)


def test_the_cli_names_the_step_that_does_not_fit_with_its_bytes():
  result = _compile_cli("--topology=v5p-8", "--stages=finetune", "--config.mesh.data=1",
                        "--config.mesh.expert=4", "--config.data.batch_size=32768",
                        "--config.data.seq_len=256")
  assert result.returncode == 1, result.stderr[-2000:]
  assert "error: finetune (train step) does not fit: the compiler refused it" in result.stderr
  assert "exceeds available HBM" in result.stderr


def test_the_cli_compiles_every_step_for_this_machine_and_a_margin_it_misses():
  result = _compile_cli("--stages=seed,finetune", "--device_memory_gib=0.001",
                        "--config.data.batch_size=8")
  assert result.returncode == 1, result.stderr[-2000:]
  assert "[compile] 3/4 finetune (train step)" in result.stdout
  assert "[compile] 4/4 finetune (eval step)" in result.stdout  # its validation passes
  assert "collectives" in result.stdout and "mesh data 8" in result.stdout
  assert "error: seed (train step) does not fit:" in result.stderr
  assert "0.00 GiB available" in result.stderr
  bad = _compile_cli("--topology=v5p-12")
  assert bad.returncode == 2 and "no v5p slice of 12 TensorCores" in bad.stderr
  rows = _compile_cli("--stages=seed")  # 4 rows on the 8 devices' data axis
  assert rows.returncode == 2
  assert "error: seed (train step): config key 'data.batch_size'" in rows.stderr
  assert presets.get("tiny").d_model == 128  # the shapes above are the tiny model's

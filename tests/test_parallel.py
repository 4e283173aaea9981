"""Meshes from config, the logical-axis rule table and the shardings it implies."""

import dataclasses
import pathlib
import re

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jbtx.config import ConfigError, ExperimentConfig, MeshConfig, OptimizerConfig, from_mapping
from jbtx.models import presets
from jbtx.models.llama import Llama, abstract_params
from jbtx.runtime import sharding
from jbtx.training.optimizer import make_optimizer
from jbtx.training.step import abstract_train_state, train_state_shardings

MODELS = pathlib.Path(__file__).parent.parent / "jbtx" / "models"


def test_minus_one_fills_the_remaining_devices():
  mesh = sharding.make_mesh(MeshConfig(data=-1, fsdp=2, tensor=2))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "expert": 1, "tensor": 2}
  assert sharding.make_mesh(MeshConfig()).shape["data"] == 8
  subset = sharding.make_mesh(MeshConfig(data=1, expert=-1), jax.devices()[:4])
  assert dict(subset.shape) == {"data": 1, "fsdp": 1, "expert": 4, "tensor": 1}


@pytest.mark.parametrize("config, key, message", [
    (MeshConfig(data=1, fsdp=3), "mesh.fsdp", "multiply to 3, but there are 8 devices"),
    (MeshConfig(data=-1, fsdp=3), "mesh.data", "which does not divide 8"),
    (MeshConfig(data=2, fsdp=2), "mesh.data", "multiply to 4"),
    (MeshConfig(dcn_data=2), "mesh.dcn_data", "there are 1 processes"),
])
def test_sizes_that_do_not_fit_the_devices_name_the_key(config, key, message):
  with pytest.raises(ConfigError, match=message) as error:
    sharding.make_mesh(config)
  assert error.value.key == key


@pytest.mark.parametrize("mesh, key", [
    ({"fsdp": 0}, "mesh.fsdp"),
    ({"data": -1, "tensor": -1}, "mesh.tensor"),
    ({"dcn_fsdp": -2}, "mesh.dcn_fsdp"),
])
def test_bad_mesh_config_values_are_rejected(mesh, key):
  config = {"model": dataclasses.asdict(presets.get("tiny")), "mesh": mesh}
  with pytest.raises(ConfigError) as error:
    from_mapping(ExperimentConfig, config)
  assert error.value.key == key


def _logical_names(tree) -> set[str]:
  leaves = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  return {name for spec in leaves for name in spec if name is not None}


def test_every_logical_axis_of_the_models_has_a_rule():
  ruled = {name for name, _ in sharding.AXIS_RULES}
  moe = presets.get("micro_moe", qk_norm=True)
  configs = [presets.get("micro"), dataclasses.replace(moe, scan_layers=False),
             dataclasses.replace(moe, moe=dataclasses.replace(moe.moe, every=2,
                                                              n_shared_experts=1))]
  for config in configs:
    assert _logical_names(nn.get_partition_spec(abstract_params(Llama(config)))) <= ruled
  activations = set()
  for source in MODELS.glob("*.py"):
    activations |= set(re.findall(r'"(act_\w+)"', source.read_text()))
  assert "act_batch" in activations and activations <= ruled


def test_parameters_and_optimizer_state_are_sharded_as_the_rules_say():
  model = Llama(presets.get("micro_moe"))
  optimizer = make_optimizer(OptimizerConfig(freeze="experts"), 10)
  mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=2, expert=2, tensor=2))
  shardings = train_state_shardings(model, optimizer, mesh)
  params = shardings.params
  expected = {
      # [vocab 97, embed]: 97 is odd -> replicated; embed over fsdp x expert (ZeRO).
      ("embed", "embedding"): P(None, ("fsdp", "expert")),
      ("lm_head", "kernel"): P(("fsdp", "expert"), None),
      ("layers", "attn", "q", "kernel"): P(None, ("fsdp", "expert"), "tensor", None),
      ("layers", "attn", "o", "kernel"): P(None, "tensor", None, ("fsdp", "expert")),
      ("layers", "attn_norm", "scale"): P(None, None),
      ("layers", "moe", "router"): P(None, "fsdp", "expert"),
      ("layers", "moe", "gate"): P(None, "expert", "fsdp", "tensor"),
      ("layers", "moe", "down"): P(None, "expert", "tensor", "fsdp"),
  }
  for path, spec in expected.items():
    leaf = params
    for key in path:
      leaf = leaf[key]
    assert leaf.spec == spec, path
  train = shardings.opt_state.inner_states["train"].inner_state[1]  # ScaleByAdamState
  assert train.mu["layers"]["moe"]["router"] == params["layers"]["moe"]["router"]
  assert train.nu["layers"]["attn"]["q"]["kernel"] == params["layers"]["attn"]["q"]["kernel"]
  assert train.count.spec == P() and shardings.step.spec == P() and shardings.rng.spec == P()
  abstract = abstract_train_state(model, optimizer, mesh)
  gate = abstract.params["layers"]["moe"]["gate"]
  assert gate.shape == (2, 4, 32, 24) and gate.sharding == params["layers"]["moe"]["gate"]
  assert abstract.rng.shape == (2,) and abstract.rng.dtype == np.uint32


@pytest.mark.parametrize("moe", [False, True])
def test_no_large_parameter_or_moment_is_replicated_over_a_sharding_axis(moe):
  """On a mesh with fsdp, expert and tensor axes, every leaf of the train state above
  64K elements is split over all three (dense stages too: the expert axis shards their
  parameters as ZeRO would); only "data" replicates parameters."""
  config = dataclasses.replace(
      presets.get("tiny_moe" if moe else "tiny"), vocab_size=512, d_model=256, d_ff=512)
  model = Llama(config)
  mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=2, expert=2, tensor=2))
  state = abstract_train_state(model, make_optimizer(OptimizerConfig(), 10), mesh)
  large = [(jax.tree_util.keystr(path), leaf) for path, leaf in
           jax.tree_util.tree_leaves_with_path(state) if leaf.size > 65536]
  assert len(large) >= 8
  for name, leaf in large:
    spec = leaf.sharding.spec
    used = {a for entry in spec for a in ((entry,) if isinstance(entry, str) else entry or ())}
    assert used == {"fsdp", "expert", "tensor"}, (name, leaf.shape, spec)


def test_an_axis_that_does_not_divide_is_dropped_from_a_multi_axis_dimension():
  mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=4, expert=2))
  assert sharding.logical_to_spec(("embed",), (32,), mesh) == P(("fsdp", "expert"))
  assert sharding.logical_to_spec(("embed",), (12,), mesh) == P("fsdp")
  assert sharding.logical_to_spec(("embed",), (6,), mesh) == P(None)


def test_global_batch_is_split_over_the_batch_axes():
  mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, expert=2))
  tokens = np.arange(8 * 6, dtype=np.int32).reshape(8, 6)
  batch = sharding.global_batch(mesh, {"tokens": tokens})["tokens"]
  assert batch.sharding.spec == P(("data", "fsdp", "expert"), None)
  assert {s.data.shape for s in batch.addressable_shards} == {(1, 6)}
  np.testing.assert_array_equal(batch, tokens)
  with pytest.raises(ConfigError, match="8 batch shards") as error:
    sharding.global_batch(mesh, {"tokens": tokens[:6]})
  assert error.value.key == "data.batch_size"


def test_a_dimension_the_mesh_axes_do_not_divide_stays_replicated():
  mesh = sharding.make_mesh(MeshConfig(data=2, tensor=4))
  assert sharding.logical_to_spec(("embed", "mlp"), (32, 72), mesh) == P(None, "tensor")
  assert sharding.logical_to_spec(("embed", "mlp"), (32, 70), mesh) == P(None, None)
  assert sharding.logical_to_spec(("act_batch", "act_length"), (8, 3), mesh) == P("data", None)

"""The sharded train step on 8 simulated devices equals the one-device step.

Tolerances (float32, highest matmul precision): loss and gradient norm 1e-5
relative; parameters 1e-4 of the learning rate absolute. Adam's first update is
`lr * g / (|g| + eps)`, ill-conditioned for gradients near eps (the sum order of a
sharded reduction changes tiny gradients relatively much), so the tests use
eps = 1e-4, which bounds the update error by `lr * |error of g| / eps`.
Steps and initialisers are compiled with XLA's cheap backend options (the default
optimisation of the unrolled threefry of an init takes ~5x longer).
"""

import dataclasses
import functools

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jbtx.config import MeshConfig, OptimizerConfig
from jbtx.models import presets
from jbtx.models.forward import valid_targets
from jbtx.models.llama import Llama, abstract_params
from jbtx.runtime import sharding
from jbtx.training.optimizer import make_optimizer
from jbtx.training.step import (
  abstract_train_state,
  make_eval_step,
  make_init,
  make_train_step,
  train_state_shardings,
)

LR = 1e-2
VOCAB = 97  # of both test models
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
MESHES = [(8, 1, 1, 1), (2, 4, 1, 1), (2, 1, 4, 1), (1, 2, 2, 2)]


def _model_config(name):
  """"micro" (dense), "mixed" (micro_moe with a dense then an MoE block: moe.every=2) or
  "expert_choice" (mixed, with expert-choice routing per row of 16 tokens)."""
  if name == "micro":
    return presets.get("micro")
  config = presets.get("micro_moe")
  moe = dataclasses.replace(config.moe, every=2)
  if name == "expert_choice":
    moe = dataclasses.replace(moe, routing="expert_choice", capacity_group_size=16)
  return dataclasses.replace(config, moe=moe)


@functools.cache
def _setup(name):
  model = Llama(_model_config(name))
  optimizer = make_optimizer(OptimizerConfig(learning_rate=LR, warmup_steps=0, eps=1e-4), 10)
  return model, optimizer


def _batch(rows=8, seq=16, seed=0):
  """Rows of two documents each, then padding (segment 0) of varying length."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, VOCAB, (rows, seq)).astype(np.int32)
  index = np.arange(seq)
  ends = rng.integers(seq // 2, seq + 1, rows)[:, None]
  segments = np.where(index < ends // 2, 1, np.where(index < ends, 2, 0)).astype(np.int32)
  positions = np.where(index < ends // 2, index, index - ends // 2).astype(np.int32)
  return {"tokens": tokens, "segment_ids": segments, "positions": positions}


@functools.cache
def _compiled_step(name, shape, accum=1):
  """The mesh of `shape` (one device for `()`), the train step of `name` compiled for
  it, and the step's StableHLO before partitioning (explicit collectives only)."""
  model, optimizer = _setup(name)
  mesh = sharding.make_mesh(MeshConfig(*shape), jax.devices()[:1] if not shape else None)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding.batch_sharding(mesh))
           for k, v in _batch().items()}
  lowered = make_train_step(model, optimizer, mesh, accum).lower(
      abstract_train_state(model, optimizer, mesh), batch)
  return mesh, lowered.compile(FAST_COMPILE), lowered.as_text()


def _run(name, shape, state, batch, accum=1):
  """One step from `state` (numpy) on `batch`; returns the new state and metrics as numpy."""
  model, optimizer = _setup(name)
  mesh, step, _ = _compiled_step(name, shape, accum)
  state = jax.device_put(state, train_state_shardings(model, optimizer, mesh))
  new_state, metrics = step(state, sharding.global_batch(mesh, batch))
  return jax.device_get(new_state), jax.device_get(metrics)


def _init(model, optimizer, mesh):
  return make_init(model, optimizer, 0, mesh).lower().compile(FAST_COMPILE)()


@functools.cache
def _reference(name):
  """(initial state, state after one step, metrics) on one device."""
  model, optimizer = _setup(name)
  mesh = sharding.make_mesh(MeshConfig(), jax.devices()[:1])
  before = jax.device_get(_init(model, optimizer, mesh))
  return (before, *_run(name, (), before, _batch()))


def _assert_same_step(state, metrics, ref_state, ref_metrics):
  for key in ("loss", "aux_loss", "grad_norm"):
    np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5, err_msg=key)
  assert metrics["tokens"] == ref_metrics["tokens"] and metrics["skipped"] == 0
  assert int(state.step) == 1
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * LR),
               state.params, ref_state.params)


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_sharded_step_equals_one_device(shape):
  """One model with a dense and an MoE block covers both layer kinds in one compile."""
  before, ref_state, ref_metrics = _reference("mixed")
  new_state, metrics = _run("mixed", shape, before, _batch())
  _assert_same_step(new_state, metrics, ref_state, ref_metrics)
  assert ref_metrics["aux_loss"] > 0 and ref_metrics["expert_load"].shape == (1, 4)
  np.testing.assert_allclose(metrics["expert_load"], ref_metrics["expert_load"], atol=1e-6)
  expert_parallel = "all_to_all" in _compiled_step("mixed", shape)[2]
  assert expert_parallel == (shape[2] > 1)  # the MoE layer exchanges tokens over "expert"


def test_sharded_expert_choice_step_equals_one_device():
  before, ref_state, ref_metrics = _reference("expert_choice")
  new_state, metrics = _run("expert_choice", (2, 1, 4, 1), before, _batch())
  _assert_same_step(new_state, metrics, ref_state, ref_metrics)
  np.testing.assert_allclose(ref_metrics["expert_load"], 0.25, rtol=1e-6)  # balanced


def test_init_is_born_sharded_and_mesh_independent():
  model, optimizer = _setup("mixed")
  mesh = sharding.make_mesh(MeshConfig(1, 2, 2, 2))
  state = _init(model, optimizer, mesh)
  gate = state.params["layers"]["block_1"]["moe"]["gate"]  # [layers, expert, embed, mlp]
  assert gate.sharding.spec == P(None, "expert", "fsdp", "tensor")
  assert {s.data.shape for s in gate.addressable_shards} == {(1, 2, 16, 12)}
  mu = state.opt_state[1].mu["layers"]["block_1"]["moe"]["gate"]
  assert mu.sharding == gate.sharding
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), _reference("mixed")[0])


def test_gradient_accumulation_equals_full_batch():
  before, ref_state, ref_metrics = _reference("micro")
  new_state, metrics = _run("micro", (2, 2, 1, 2), before, _batch(), accum=2)
  _assert_same_step(new_state, metrics, ref_state, ref_metrics)


def test_non_finite_step_is_skipped_and_leaves_the_state_untouched():
  before = _reference("micro")[0]
  batch = _batch()
  batch["tokens"][3, 5] = VOCAB  # out of the vocabulary: the embedding lookup yields NaN
  new_state, metrics = _run("micro", (), before, batch)
  assert metrics["skipped"] == 1 and not np.isfinite(metrics["loss"])
  assert int(new_state.step) == 1
  jax.tree.map(np.testing.assert_array_equal,
               (new_state.params, new_state.opt_state, new_state.rng),
               (before.params, before.opt_state, before.rng))


def test_micro_batched_eval_step_equals_whole_batch():
  """The eval step in micro-batches (as the 7B configs run it) sums the same loss."""
  model, _ = _setup("mixed")
  params = _reference("mixed")[0].params
  results = []
  for shape, micro_batches in [((), 1), ((2, 2, 2, 1), 4)]:
    mesh = sharding.make_mesh(MeshConfig(*shape), jax.devices()[:1] if not shape else None)
    step = make_eval_step(model, mesh, micro_batches)
    placed = jax.device_put(params, sharding.param_shardings(abstract_params(model), mesh))
    results.append(jax.device_get(step(placed, sharding.global_batch(mesh, _batch()))))
  (whole, count), (micro, micro_count) = results
  assert whole > 0 and count == micro_count == np.sum(valid_targets(_batch()["segment_ids"]))
  np.testing.assert_allclose(micro, whole, rtol=1e-5)

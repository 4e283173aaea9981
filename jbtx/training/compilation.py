"""Ahead-of-time compilation of a stage's steps for any devices, and what they cost.

    cost = compile_train_step(config, devices)   # devices: real ones, or a TPU slice's
    cost.total_bytes, cost.state_bytes, cost.collectives, cost.xla_flops

The steps are built exactly as the training loop builds them (`make_train_step` with
the config's optimizer and micro-batches, `abstract_train_state`, `abstract_batch`), on
the config's mesh over `devices`, then lowered and compiled without any array
existing: compile-only TPU devices (`jbtx.runtime.topologies`) give the TPU compiler's
memory analysis and HLO on a machine without TPUs. Numbers are per device.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jbtx.config import ExperimentConfig
from jbtx.inference.sharded import ragged_decoder
from jbtx.models.llama import Llama, abstract_params
from jbtx.runtime import sharding
from jbtx.training.metrics import train_flops_per_token
from jbtx.training.optimizer import make_optimizer
from jbtx.training.step import (
    abstract_batch,
    abstract_train_state,
    make_eval_step,
    make_train_step,
)

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all",
               "collective-permute")
_COLLECTIVE_OP = re.compile(r"\s(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")


@dataclasses.dataclass(frozen=True)
class StepCost:
  """One compiled step's needs, per device.

  Attributes:
    mesh: the mesh's axis sizes.
    state_bytes: the persistent state the step reads: parameters and optimizer state
      (training), parameters (evaluation, generation).
    argument_bytes, output_bytes, alias_bytes, temp_bytes, code_bytes: XLA's memory
      analysis (arguments include the state; outputs aliased to donated arguments
      count once).
    xla_flops: XLA's cost analysis (a loop body, e.g. a scanned layer or a
      micro-batch, counts once, not once per iteration).
    model_flops: jbtx's count of the step's FLOPs (6 · active parameters · tokens plus
      attention for training, a third of that for a forward pass).
    collectives: collective ops in the compiled HLO, by kind.
  """

  mesh: dict[str, int]
  state_bytes: int
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  code_bytes: int
  xla_flops: float
  model_flops: float
  collectives: dict[str, int]

  @property
  def total_bytes(self) -> int:
    """Peak device memory: arguments, outputs not aliased to them, temporaries, code."""
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes \
        + self.code_bytes


def shard_bytes(tree: Any) -> int:
  """Bytes per device of a tree of sharded `jax.ShapeDtypeStruct`s (its largest shard)."""
  return sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
             for leaf in jax.tree.leaves(tree))


def collective_counts(hlo_text: str) -> dict[str, int]:
  """Collective ops of a compiled module's HLO text by kind (async pairs once)."""
  counts = collections.Counter(_COLLECTIVE_OP.findall(hlo_text))
  return {kind: counts[kind] for kind in COLLECTIVES if counts[kind]}


def _cost(compiled: Any, mesh: jax.sharding.Mesh, state: Any, model_flops: float) -> StepCost:
  memory = compiled.memory_analysis()
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, Sequence) else analysis
  return StepCost(mesh=dict(mesh.shape), state_bytes=shard_bytes(state),
                  argument_bytes=memory.argument_size_in_bytes,
                  output_bytes=memory.output_size_in_bytes,
                  alias_bytes=memory.alias_size_in_bytes,
                  temp_bytes=memory.temp_size_in_bytes,
                  code_bytes=memory.generated_code_size_in_bytes,
                  xla_flops=float((analysis or {}).get("flops", 0.0)),
                  model_flops=model_flops, collectives=collective_counts(compiled.as_text()))


def _tokens_flops(config: ExperimentConfig, rows: int, devices: int, passes: float) -> float:
  """`passes` thirds of the training FLOPs of `rows` sequences, per device."""
  per_token = train_flops_per_token(config.model, config.data.seq_len)
  return per_token * rows * config.data.seq_len * passes / 3 / devices


def compile_step(step: Any, mesh: Mesh, args: Sequence[Any], state: Any,
                 model_flops: float) -> StepCost:
  """Any jit'd `step` lowered for the shapes `args` and compiled; `state` is the part of
  the arguments that persists on the devices (parameters, optimizer state)."""
  return _cost(step.lower(*args).compile(), mesh, state, model_flops)


def compile_train_step(config: ExperimentConfig, devices: Sequence[jax.Device]) -> StepCost:
  """The training step of `config` compiled for `devices` (its mesh over them)."""
  mesh = sharding.make_mesh(config.mesh, devices)
  model = Llama(config.model)
  optimizer = make_optimizer(config.optimizer, config.train.steps)
  step = make_train_step(model, optimizer, mesh, config.optimizer.grad_accum_steps)
  state = abstract_train_state(model, optimizer, mesh)
  flops = _tokens_flops(config, config.data.batch_size, len(devices), passes=3)
  return compile_step(step, mesh, (state, abstract_batch(config.data, mesh)), state, flops)


def abstract_sharded_params(model: Llama, mesh: jax.sharding.Mesh) -> Any:
  """The model's parameters as shapes placed as training shards them."""
  boxed = abstract_params(model)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      nn.meta.unbox(boxed), sharding.param_shardings(boxed, mesh))


def compile_eval_step(config: ExperimentConfig, devices: Sequence[jax.Device]) -> StepCost:
  """The validation step (summed loss of a batch) of `config` compiled for `devices`."""
  mesh = sharding.make_mesh(config.mesh, devices)
  model = Llama(config.model)
  params = abstract_sharded_params(model, mesh)
  flops = _tokens_flops(config, config.data.batch_size, len(devices), passes=1)
  eval_step = make_eval_step(model, mesh, config.optimizer.grad_accum_steps)
  return compile_step(eval_step, mesh,
                      (params, abstract_batch(config.data, mesh)), params, flops)


def abstract_rows(mesh: Mesh, shape: tuple[int, ...], dtype: Any = jnp.int32
                  ) -> jax.ShapeDtypeStruct:
  """An input whose rows are split over the mesh's batch axes, as shapes."""
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.rows_sharding(mesh))


def compile_generation(config: ExperimentConfig, devices: Sequence[jax.Device], rows: int,
                       prompt_len: int, new_tokens: int) -> StepCost:
  """Greedy decoding of `rows` prompts of `prompt_len` tokens, `new_tokens` each, with
  the model sharded over `config.mesh` (`jbtx.inference.sharded.ragged_decoder`)."""
  mesh = sharding.make_mesh(config.mesh, devices)
  model = Llama(config.model)
  params = abstract_sharded_params(model, mesh)
  rows = -(-rows // sharding.batch_shards(mesh)) * sharding.batch_shards(mesh)
  inputs = (abstract_rows(mesh, (rows, prompt_len)), abstract_rows(mesh, (rows,)))
  per_token = train_flops_per_token(config.model, prompt_len + new_tokens) / 3
  flops = per_token * rows * (prompt_len + new_tokens) / len(devices)
  return compile_step(ragged_decoder(model, mesh, new_tokens, None), mesh,
                      (params, *inputs), params, flops)

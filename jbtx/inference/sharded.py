"""Inference with the model sharded over a mesh, as training shards it: no step gathers
a whole model onto one device.

    generate = make_generator(model, params, mesh)   # params placed by `param_shardings`
    ids = generate(tokens, lengths, max_new_tokens=32, eos_id=2)   # [batch, 32]

`on_mesh(step, mesh, params_sharding, n_rows)` compiles `step(params, *rows)` for a
mesh: the parameters placed as `params_sharding` says, every other input's rows split
over the batch axes, the output replicated, and the model's logical constraints
active (`sharding.sharding_rules`). Every process passes the same whole inputs; their
rows are padded to split evenly (`sharding.padded_rows`) and the padding is dropped
from the output.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jbtx.inference.generate import generate_ragged
from jbtx.models.llama import abstract_params
from jbtx.runtime import sharding

Generate = Callable[..., np.ndarray]  # (tokens, lengths, max_new_tokens, eos_id=) -> ids


def on_mesh(step: Callable[..., Any], mesh: Mesh, params_sharding: Any, n_rows: int) -> Any:
  """`step(params, *rows)` jit-compiled for `mesh` (module docstring)."""

  def run(params, *rows):
    with sharding.sharding_rules(mesh):
      return step(params, *rows)

  rows = sharding.rows_sharding(mesh)
  return jax.jit(run, in_shardings=(params_sharding, *[rows] * n_rows),
                 out_shardings=NamedSharding(mesh, P()))


def run_rows(compiled: Any, params: Any, mesh: Mesh, *rows: np.ndarray) -> Any:
  """`compiled(params, *rows)` (from `on_mesh`) on whole host arrays, padding the rows
  to split evenly and dropping the padding from the output (numpy arrays)."""
  padded, count = sharding.padded_rows([np.asarray(r) for r in rows], mesh)
  out = compiled(params, *sharding.global_rows(mesh, *padded))
  return jax.tree.map(lambda x: np.asarray(x)[:count], out)


def params_sharding(model: nn.Module, mesh: Mesh) -> Any:
  """How training places `model`'s parameters on `mesh`."""
  return sharding.param_shardings(abstract_params(model), mesh)


def stacked_sharding(model: nn.Module, mesh: Mesh) -> Any:
  """Placement of N models' parameters stacked on a new leading axis `[N, ...]`: each
  member sharded as training shards it, the new axis whole on every device."""
  return jax.tree.map(lambda s: NamedSharding(mesh, P(None, *s.spec)),
                      params_sharding(model, mesh))


@functools.lru_cache(maxsize=32)
def ragged_decoder(model: nn.Module, mesh: Mesh, max_new_tokens: int,
                   eos_id: int | None) -> Any:
  """`(params, prompts [batch, len], lengths [batch]) -> ids [batch, max_new_tokens]`:
  `generate_ragged` on `mesh`, the KV cache sharded like the attention's keys."""
  step = functools.partial(generate_ragged, model, max_new_tokens=max_new_tokens,
                           eos_id=eos_id)
  return on_mesh(lambda params, prompts, lengths: step(params, prompts, lengths), mesh,
                 params_sharding(model, mesh), 2)


def make_generator(model: nn.Module, params: Any, mesh: Mesh) -> Generate:
  """Greedy ragged decoding (`generate_ragged`'s contract) with `params` sharded over
  `mesh` (placed by `params_sharding`)."""

  def generate(tokens: Any, lengths: Any, max_new_tokens: int,
               eos_id: int | None = None) -> np.ndarray:
    decoder = ragged_decoder(model, mesh, max_new_tokens, eos_id)
    return run_rows(decoder, params, mesh, np.asarray(tokens, np.int32),
                    np.asarray(lengths, np.int32))

  return generate

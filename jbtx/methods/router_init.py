"""Router initialisation from hidden states (`btx.router_init = "hidden"`).

Not in the BTX paper, which initialises the new router at random; this is what
mergekit-moe's `hidden` mode does for merged experts. For expert i, take the mean of
the seed's MoE-layer inputs (the output of each layer's `mlp_norm`) over tokens of
expert i's domain; centre the experts' means on their average and scale each to unit
norm. Router column i of layer l is that direction, so a token's logit for expert i is
its input's projection on how domain i differs from the others.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jbtx.inference.sharded import on_mesh, params_sharding
from jbtx.runtime import sharding


def _mlp_inputs(model: nn.Module, params: Any, batch: Mapping[str, jax.Array]) -> list:
  """Every layer's FFN input `[layers, batch, seq, embed]` (scanned or unrolled)."""
  _, state = model.apply({"params": params}, batch["tokens"], positions=batch["positions"],
                         segment_ids=batch["segment_ids"],
                         capture_intermediates=lambda m, _: m.name == "mlp_norm",
                         mutable=["intermediates"])
  found = []

  def visit(tree: Mapping[str, Any]) -> None:
    for key in sorted(tree, key=_layer_order):
      if key == "mlp_norm":
        (value,) = tree[key]["__call__"]
        found.append(value if value.ndim == 4 else value[None])
      elif isinstance(tree[key], Mapping):
        visit(tree[key])

  visit(state["intermediates"])
  return found


def _layer_order(key: str) -> tuple[int, str]:
  suffix = key.rsplit("_", 1)[-1]
  return (int(suffix), key) if key.startswith("layers_") and suffix.isdigit() else (-1, key)


def _hidden_sums(model: nn.Module, params: Any, batch: Mapping[str, jax.Array]):
  """Each layer's FFN inputs summed over the real tokens `[layers, embed]`, and their count."""
  hidden = jnp.concatenate(_mlp_inputs(model, params, batch), axis=0).astype(jnp.float32)
  real = (batch["segment_ids"] > 0).astype(jnp.float32)
  return jnp.einsum("lbsd,bs->ld", hidden, real), jnp.sum(real)


@functools.lru_cache(maxsize=8)
def hidden_sums_step(model: nn.Module, mesh: Mesh | None) -> Any:
  """`(params, batch) -> (sums [layers, embed], count)`, jit-compiled; with `mesh`,
  the parameters placed as training shards them and the batch's rows split over the
  batch axes (no device holds the whole model)."""
  sums = functools.partial(_hidden_sums, model)
  return jax.jit(sums) if mesh is None else on_mesh(sums, mesh, params_sharding(model, mesh), 1)


def mean_hidden(model: nn.Module, params: Any, batches: Iterable[Mapping[str, np.ndarray]],
                mesh: Mesh | None = None) -> np.ndarray:
  """Mean FFN input of each layer over the real tokens (segment id > 0): `[layers, embed]`
  (`hidden_sums_step`; with `mesh`, `params` placed by `params_sharding`)."""
  step = hidden_sums_step(model, mesh)
  total, count = 0.0, 0.0
  for batch in batches:
    placed = ({k: jnp.asarray(v) for k, v in batch.items()} if mesh is None
              else sharding.global_batch(mesh, sharding.local_rows(dict(batch))))
    s, n = step(params, placed)
    total, count = total + np.asarray(s, np.float64), count + float(n)
  if count == 0:
    raise ValueError("router_init 'hidden': the batches hold no tokens")
  return total / count


def hidden_routers(means: np.ndarray, dtype: Any = np.float32) -> np.ndarray:
  """Router kernels `[layers, embed, E]` from per-expert mean hidden states `[E, layers, embed]`.

  Each column is the expert's mean minus the experts' average, scaled to unit norm (a
  column whose mean equals the average stays 0).
  """
  centred = means - means.mean(axis=0, keepdims=True)
  norms = np.linalg.norm(centred, axis=-1, keepdims=True)
  unit = np.where(norms > 1e-12, centred / np.maximum(norms, 1e-12), 0.0)
  return unit.transpose(1, 2, 0).astype(dtype)

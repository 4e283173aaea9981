"""Router initialisation from hidden states (`btx.router_init = "hidden"`).

Not in the BTX paper, which initialises the new router at random; this is what
mergekit-moe's `hidden` mode does for merged experts. For expert i, take the mean of
the seed's MoE-layer inputs (the output of each layer's `mlp_norm`) over tokens of
expert i's domain; centre the experts' means on their average and scale each to unit
norm. Router column i of layer l is that direction, so a token's logit for expert i is
its input's projection on how domain i differs from the others.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


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


def mean_hidden(model: nn.Module, params: Any,
                batches: Iterable[Mapping[str, np.ndarray]]) -> np.ndarray:
  """Mean FFN input of each layer over the real tokens (segment id > 0): `[layers, embed]`."""

  @jax.jit
  def sums(params, batch):
    hidden = jnp.concatenate(_mlp_inputs(model, params, batch), axis=0).astype(jnp.float32)
    real = (batch["segment_ids"] > 0).astype(jnp.float32)
    return jnp.einsum("lbsd,bs->ld", hidden, real), jnp.sum(real)

  total, count = 0.0, 0.0
  for batch in batches:
    s, n = sums(params, {k: jnp.asarray(v) for k, v in batch.items()})
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

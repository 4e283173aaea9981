"""LLaMA-MoE (Zhu et al. 2024): each dense SwiGLU FFN split into E experts of its neurons.

    neuron j of a layer   = (gate[:, j], up[:, j], down[j, :])    kernels [embed, mlp], [mlp, embed]
    expert e              = the neurons of partition row e, in the MoE layout
                            gate/up [E, embed, m]   down [E, m, embed]

Partition methods (`llama_moe.split`), for a layer of width f:

  random         IndependentRandom: a seeded shuffle cut into E parts of f/E (the
                 released LLaMA-MoE models).
  clustering     IndependentClustering: balanced k-means over the neurons' up-projection
                 vectors `up[:, j]` scaled to unit norm; E clusters of f/E.
  sharing_inner  SharingInner: with m = f/(E + S), the S·m neurons of highest importance
                 over all domains are in every expert; the other E·m are partitioned,
                 each expert taking the neurons most important on its domain. Experts
                 are (S + 1)·m wide.
  sharing_inter  SharingInter: the same shared neurons form S always-on residual experts
                 (`moe.n_shared_experts = S`, width m); the routed experts are m wide.

Importance of neuron j (`importance`) is LLaMA-MoE's `|a ⊙ ∂L/∂a|` at the input of the
down projection (a = silu(gate·x) ⊙ up·x), summed over the tokens of a data sample,
one vector per domain. Expert e works for domain `e mod D` of the D measured domains.
Expert outputs are rescaled by the MoE's `output_scale` (E/k by default), since k of E
experts carry about k/E of the dense FFN's output.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jbtx.config import ModelConfig
from jbtx.config.llama_moe import expert_width
from jbtx.methods.clusters import balanced_assignment, balanced_kmeans
from jbtx.models.layers import MLP
from jbtx.models.llama import stack_layers
from jbtx.models.moe import MoE
from jbtx.training.step import next_token_loss


class Partition(NamedTuple):
  """One layer's neurons by expert.

  experts: int `[E, width]`: the neurons of each routed expert (a row is sorted).
  shared: int `[S·m]`: the neurons of the always-on residual experts (sharing_inter;
    empty otherwise).
  """

  experts: np.ndarray
  shared: np.ndarray


def random_partition(d_ff: int, n_experts: int, rng: np.random.Generator) -> Partition:
  """IndependentRandom: a shuffle of the `d_ff` neurons cut into `n_experts` equal rows."""
  expert_width(d_ff, n_experts, "random")
  rows = rng.permutation(d_ff).reshape(n_experts, -1)
  return Partition(np.sort(rows, axis=1), np.zeros((0,), np.int64))


def clustering_partition(up: np.ndarray, n_experts: int, *, seed: int = 0,
                         iterations: int = 20) -> Partition:
  """IndependentClustering: balanced k-means of the unit-norm neuron vectors `up [embed, f]`."""
  expert_width(up.shape[1], n_experts, "clustering")
  vectors = np.asarray(up, np.float64).T
  vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
  _, assignment = balanced_kmeans(vectors, n_experts, seed=seed, iterations=iterations)
  return _rows(assignment, n_experts)


def sharing_partition(scores: np.ndarray, n_experts: int, n_shared: int,
                      inter: bool) -> Partition:
  """SharingInner (`inter=False`) or SharingInter from importance `scores [D, f]`.

  Shared: the S·m neurons with the highest importance summed over domains, each domain's
  vector first normalised to sum 1 (so domains weigh the same whatever their loss
  scale). The rest go one each to the experts, expert e preferring the neurons most
  important on domain `e mod D` (greedy by importance, m per expert).
  """
  scores = np.asarray(scores, np.float64)
  d_ff = scores.shape[1]
  method = "sharing_inter" if inter else "sharing_inner"
  width, _ = expert_width(d_ff, n_experts, method, n_shared)
  m = d_ff // (n_experts + n_shared)
  normalised = scores / np.maximum(scores.sum(axis=1, keepdims=True), 1e-30)
  ranked = np.argsort(-normalised.sum(axis=0), kind="stable")
  shared, rest = np.sort(ranked[:n_shared * m]), np.sort(ranked[n_shared * m:])
  per_expert = normalised[np.arange(n_experts) % len(normalised)][:, rest]  # [E, rest]
  routed = rest[_rows(balanced_assignment(-per_expert.T), n_experts).experts]
  if inter:
    return Partition(np.sort(routed, axis=1), shared)
  inner = np.concatenate([np.broadcast_to(shared, (n_experts, len(shared))), routed], axis=1)
  assert inner.shape[1] == width
  return Partition(np.sort(inner, axis=1), np.zeros((0,), np.int64))


def _rows(assignment: np.ndarray, n_experts: int) -> Partition:
  """An equal-size assignment `[f]` (neuron -> expert) as a Partition."""
  order = np.argsort(assignment, kind="stable")
  return Partition(order.reshape(n_experts, -1), np.zeros((0,), np.int64))


def split_ffn(ffn: Mapping[str, np.ndarray], partition: Partition) -> dict[str, Any]:
  """One dense FFN -> its MoE experts (and residual experts).

  Args:
    ffn: `gate`, `up` `[embed, f]` and `down` `[f, embed]` kernels.
    partition: the neurons of each expert.

  Returns:
    `gate`, `up` `[E, embed, m]`, `down` `[E, m, embed]` and, with residual experts,
    `shared` = {gate, up: {kernel: [embed, S·m]}, down: {kernel: [S·m, embed]}}.
  """
  rows = partition.experts
  moe = {"gate": np.moveaxis(np.asarray(ffn["gate"])[:, rows], 1, 0),
         "up": np.moveaxis(np.asarray(ffn["up"])[:, rows], 1, 0),
         "down": np.asarray(ffn["down"])[rows]}
  if len(partition.shared):
    cols = partition.shared
    moe["shared"] = {"gate": {"kernel": np.asarray(ffn["gate"])[:, cols]},
                     "up": {"kernel": np.asarray(ffn["up"])[:, cols]},
                     "down": {"kernel": np.asarray(ffn["down"])[cols]}}
  return moe


def importance(model: nn.Module, params: Any,
               batches: Iterable[Mapping[str, np.ndarray]]) -> np.ndarray:
  """Neuron importance `Σ_tokens |a ⊙ ∂L/∂a|` of a dense model: float64 `[layers, d_ff]`.

  a is each FFN's down-projection input; L the batch's mean next-token loss. The
  gradient is taken with respect to a per-token scale s on a (at s = 1), whose
  gradient is exactly a ⊙ ∂L/∂a, intercepting the MLPs' `down` projections.

  Args:
    model: a dense `Llama` with unrolled layers (`scan_layers=False`).
    params: its parameters.
    batches: training batches (`tokens`, `positions`, `segment_ids` `[batch, seq]`).
  """
  config = model.config
  if config.moe is not None or config.scan_layers:
    raise ValueError("importance is measured on a dense model with unrolled layers")

  def loss(scales, params, batch):
    def scale_down_input(next_fun, args, kwargs, context):
      module = context.module
      if (context.method_name == "__call__" and module.name == "down"
          and isinstance(module.parent, MLP)):
        layer = int(module.parent.parent.name.removeprefix("layers_"))
        args = (args[0] * scales[layer].astype(args[0].dtype), *args[1:])
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(scale_down_input):
      logits = model.apply({"params": params}, batch["tokens"], positions=batch["positions"],
                           segment_ids=batch["segment_ids"])
    return next_token_loss(logits, batch)[0]

  @jax.jit
  def batch_importance(params, batch):
    shape = (config.n_layers, *batch["tokens"].shape, config.d_ff)
    grads = jax.grad(loss)(jnp.ones(shape, jnp.float32), params, batch)
    return jnp.sum(jnp.abs(grads), axis=(1, 2))

  total = np.zeros((config.n_layers, config.d_ff))
  seen = False
  for batch in batches:
    total += np.asarray(batch_importance(params, {k: jnp.asarray(v) for k, v in batch.items()}),
                        np.float64)
    seen = True
  if not seen:
    raise ValueError("importance: no batches")
  return total


def fresh_routers(config: ModelConfig, seed: int) -> list[dict[str, np.ndarray]]:
  """Each layer's new router parameters (`router*`), from the MoE layer's initialiser."""

  @jax.jit
  def routers(layer):
    x = jnp.zeros((1, 1, config.d_model), jnp.float32)
    params = nn.meta.unbox(MoE(config).init(jax.random.fold_in(jax.random.key(seed), layer),
                                            x)["params"])
    return {k: v for k, v in params.items() if k.startswith("router")}

  return [jax.tree.map(np.asarray, routers(layer)) for layer in range(config.n_layers)]


def split_params(dense: dict[str, Any], config: ModelConfig,
                 layer_partitions: list[Partition], seed: int) -> dict[str, Any]:
  """The MoE model `config` from a dense model's unrolled parameters.

  Args:
    dense: the dense model's parameters, layers unrolled (`layers_{i}`).
    config: the split model (`moe` set: the split experts' widths).
    layer_partitions: each layer's neurons by expert.
    seed: seeds the new routers (one stream per layer).

  Returns:
    The parameter tree of `config`, in its layout (scanned or unrolled).
  """
  params = {k: v for k, v in dense.items() if not k.startswith("layers_")}
  routers = fresh_routers(config, seed)
  for layer, partition in enumerate(layer_partitions):
    block = dict(dense[f"layers_{layer}"])
    ffn = {k: v["kernel"] for k, v in block.pop("mlp").items()}
    block["moe"] = split_ffn(ffn, partition) | routers[layer]
    params[f"layers_{layer}"] = block
  return stack_layers(params, config.n_layers) if config.scan_layers else params

"""Ways to compute `Σ_j w[t, j] · SwiGLU_{e[t, j]}(x[t])` for a routing, all equal.

  loop      one masked pass per expert over all tokens; the reference (oracle).
  dense     every expert on every token, combined with the [T, E] gate matrix
            (E/k times the needed FLOPs; fine for soft routing or tiny E).
  dropless  sort the T·k assignments by expert, grouped matmuls over the contiguous
            groups (`jax.lax.ragged_dot`), unsort; exact, no capacity, no padding.
  capacity  GShard: per group of tokens, each expert takes at most C assignments
            (first choices before second choices, earlier tokens first); the rest
            are dropped. Dispatch/combine are einsums with one-hot [S, E, C] tensors.

Expert kernels: gate, up `[E, embed, mlp]`, down `[E, mlp, embed]`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jbtx.models.routing import Routing, gate_matrix


class Experts(NamedTuple):
  gate: jax.Array  # [E, embed, mlp]
  up: jax.Array  # [E, embed, mlp]
  down: jax.Array  # [E, mlp, embed]


def swiglu(x: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array) -> jax.Array:
  """One expert: `[tokens, embed] -> [tokens, embed]`."""
  return (jax.nn.silu(x @ gate) * (x @ up)) @ down


def loop(x: jax.Array, routing: Routing, experts: Experts) -> jax.Array:
  """Reference: each expert runs on all tokens; its output counts where it was chosen."""
  gates = gate_matrix(routing, experts.gate.shape[0])  # [T, E]
  out = jnp.zeros(x.shape, jnp.float32)
  for e in range(experts.gate.shape[0]):
    y = swiglu(x, experts.gate[e], experts.up[e], experts.down[e])
    out = out + gates[:, e:e + 1] * y.astype(jnp.float32)
  return out.astype(x.dtype)


def dense(x: jax.Array, routing: Routing, experts: Experts) -> jax.Array:
  """All experts on all tokens as batched einsums."""
  gates = gate_matrix(routing, experts.gate.shape[0]).astype(x.dtype)
  h = jax.nn.silu(jnp.einsum("td,edf->etf", x, experts.gate)) * jnp.einsum(
      "td,edf->etf", x, experts.up)
  y = jnp.einsum("etf,efd->etd", h, experts.down)
  return jnp.einsum("etd,te->td", y, gates)


def dropless(x: jax.Array, routing: Routing, experts: Experts) -> jax.Array:
  """Sort by expert + grouped matmul (`ragged_dot`); every assignment is computed."""
  n_tokens, k = routing.experts.shape
  n_experts = experts.gate.shape[0]
  flat_experts = routing.experts.reshape(-1)  # [T*k]
  order = jnp.argsort(flat_experts, stable=True)
  group_sizes = jnp.bincount(flat_experts, length=n_experts).astype(jnp.int32)
  x_sorted = jnp.take(x, order // k, axis=0)  # [T*k, embed]
  h = jax.nn.silu(jax.lax.ragged_dot(x_sorted, experts.gate, group_sizes)) * (
      jax.lax.ragged_dot(x_sorted, experts.up, group_sizes))
  y_sorted = jax.lax.ragged_dot(h, experts.down, group_sizes)  # [T*k, embed]
  y = jnp.take(y_sorted, jnp.argsort(order), axis=0).reshape(n_tokens, k, -1)
  return jnp.einsum("tkd,tk->td", y, routing.weights.astype(x.dtype))


def capacity(n_tokens: int, n_experts: int, k: int, factor: float) -> int:
  """Slots per expert for `n_tokens` tokens: `ceil(factor · n_tokens · k / E)`."""
  return max(1, math.ceil(factor * n_tokens * k / n_experts))


def capacity_masks(routing: Routing, n_experts: int, slots: int):
  """GShard dispatch (bool) and combine (float) tensors `[S, E, C]` for one group.

  Priority: all first choices before any second choice; within a choice, token order.
  Returns `(dispatch, combine, kept)`, kept `[S, k]` telling which assignments fit.
  """
  one_hot = jax.nn.one_hot(routing.experts.T, n_experts, dtype=jnp.int32)  # [k, S, E]
  k, s, _ = one_hot.shape
  flat = one_hot.reshape(k * s, n_experts)
  position = (jnp.cumsum(flat, axis=0) - 1).reshape(k, s, n_experts)
  slot = jnp.sum(position * one_hot, axis=-1)  # [k, S]
  kept = slot < slots
  slot_one_hot = jax.nn.one_hot(jnp.where(kept, slot, slots), slots, dtype=jnp.float32)
  expert_one_hot = one_hot.astype(jnp.float32)
  dispatch = jnp.einsum("kse,ksc->sec", expert_one_hot, slot_one_hot)
  combine = jnp.einsum("kse,ksc,ks->sec", expert_one_hot, slot_one_hot, routing.weights.T)
  return dispatch, combine, kept.T


def capacity_dispatch(x: jax.Array, routing: Routing, experts: Experts, factor: float,
                      group_size: int) -> tuple[jax.Array, jax.Array]:
  """GShard capacity-based dispatch. Returns `(output [T, embed], dropped fraction)`.

  Tokens are split into groups of `group_size` (the last group may be smaller only if
  T is; T must be a multiple of the group size otherwise).
  """
  n_tokens, d = x.shape
  n_experts = experts.gate.shape[0]
  size = min(group_size, n_tokens)
  if n_tokens % size:
    raise ValueError(f"capacity dispatch: {n_tokens} tokens do not split into groups of "
                     f"{size}; set moe.capacity_group_size to a divisor")
  groups = n_tokens // size
  slots = capacity(size, n_experts, routing.experts.shape[1], factor)
  grouped = Routing(routing.experts.reshape(groups, size, -1),
                    routing.weights.reshape(groups, size, -1))
  dispatch_mask, combine, kept = jax.vmap(
      lambda e, w: capacity_masks(Routing(e, w), n_experts, slots))(*grouped)
  xg = x.reshape(groups, size, d)
  expert_in = jnp.einsum("gsec,gsd->egcd", dispatch_mask.astype(x.dtype), xg)
  h = jax.nn.silu(jnp.einsum("egcd,edf->egcf", expert_in, experts.gate)) * jnp.einsum(
      "egcd,edf->egcf", expert_in, experts.up)
  expert_out = jnp.einsum("egcf,efd->egcd", h, experts.down)
  out = jnp.einsum("gsec,egcd->gsd", combine.astype(x.dtype), expert_out)
  return out.reshape(n_tokens, d), 1.0 - jnp.mean(kept.astype(jnp.float32))


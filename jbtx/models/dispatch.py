"""Ways to compute `Σ_j w[t, j] · SwiGLU_{e[t, j]}(x[t])` for a routing, all equal.

  loop      one masked pass per expert over all tokens; the reference (oracle).
  dense     every expert on every token, combined with the [T, E] gate matrix
            (E/k times the needed FLOPs; fine for soft routing or tiny E).
  dropless  sort the T·k assignments by expert, grouped matmuls over the contiguous
            groups (`jax.lax.ragged_dot`), unsort; exact, no capacity, no padding.
            XLA:CPU lowers `ragged_dot` to a masked product with every group (E/k
            times the FLOPs, plus [E, T·k, ·] masks); GPU and TPU have grouped kernels.
  blocked   dropless too, for CPU: sort by expert, then for each expert a loop over
            blocks of its rows that gathers the tokens, runs the whole SwiGLU and
            scatter-adds the gated output; a hand-written VJP does the same backwards.
  capacity  GShard: per group of tokens, each expert takes at most C assignments
            (first choices before second choices, earlier tokens first); the rest
            are dropped. Dispatch/combine are einsums with one-hot [S, E, C] tensors.
  expert_choice  for expert-choice routing only: every expert runs on exactly the C
            tokens it took (a gather to [E, C, embed], batched SwiGLUs, a scatter-add).

Expert kernels: gate, up `[E, embed, mlp]`, down `[E, mlp, embed]`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jbtx.models.routing import ExpertChoice, Routing, capacity, gate_matrix


class Experts(NamedTuple):
  gate: jax.Array  # [E, embed, mlp]
  up: jax.Array  # [E, embed, mlp]
  down: jax.Array  # [E, mlp, embed]


def sort_by_expert(flat_experts: jax.Array, n_experts: int) -> jax.Array:
  """The stable order `[n]` (int32) that sorts the assignments `flat_experts [n]` by expert.

  Sorts one packed int32 key `expert · n + position` where it fits in 31 bits: XLA:CPU
  sorts it 5x faster than `argsort(stable=True)`, which sorts (key, index) pairs
  (2.3 vs 11 ms for 65,536 assignments).
  """
  n = flat_experts.shape[0]
  if n_experts * n >= 2**31:
    return jnp.argsort(flat_experts, stable=True).astype(jnp.int32)
  return lax.sort(flat_experts.astype(jnp.int32) * n + jnp.arange(n, dtype=jnp.int32)) % n


def inverse_permutation(order: jax.Array) -> jax.Array:
  """`inverse[order[i]] = i`: a scatter, not a second sort."""
  position = jnp.arange(order.shape[0], dtype=order.dtype)
  return jnp.zeros_like(order).at[order].set(position, unique_indices=True)


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
  """All experts on all tokens: one SwiGLU of width E·mlp whose hidden units are gated.

  `Σ_e g_e · (h_e @ down_e) = [g_1 h_1, …, g_E h_E] @ [down_1; …; down_E]`, so no
  per-expert output `[E, T, embed]` is materialised.
  """
  n_experts, d, f = experts.gate.shape
  gates = gate_matrix(routing, n_experts).astype(x.dtype)
  stacked = lambda w: jnp.transpose(w, (1, 0, 2)).reshape(d, n_experts * f)
  h = jax.nn.silu(x @ stacked(experts.gate)) * (x @ stacked(experts.up))
  h = (h.reshape(-1, n_experts, f) * gates[:, :, None]).reshape(-1, n_experts * f)
  return h @ experts.down.reshape(n_experts * f, d)


def dropless(x: jax.Array, routing: Routing, experts: Experts) -> jax.Array:
  """Sort by expert + grouped matmul (`ragged_dot`); every assignment is computed."""
  n_tokens, k = routing.experts.shape
  n_experts = experts.gate.shape[0]
  flat_experts = routing.experts.reshape(-1)  # [T*k]
  order = sort_by_expert(flat_experts, n_experts)
  group_sizes = jnp.bincount(flat_experts, length=n_experts).astype(jnp.int32)
  x_sorted = jnp.take(x, order // k, axis=0)  # [T*k, embed]
  h = jax.nn.silu(jax.lax.ragged_dot(x_sorted, experts.gate, group_sizes)) * (
      jax.lax.ragged_dot(x_sorted, experts.up, group_sizes))
  y_sorted = jax.lax.ragged_dot(h, experts.down, group_sizes)  # [T*k, embed]
  y = jnp.take(y_sorted, inverse_permutation(order), axis=0).reshape(n_tokens, k, -1)
  return jnp.einsum("tkd,tk->td", y, routing.weights.astype(x.dtype))


def expert_choice(x: jax.Array, choice: ExpertChoice, experts: Experts) -> jax.Array:
  """Expert-choice dispatch: `out[t] = Σ_{e, c: tokens[e, c] = t} gates[e, c] · FF_e(x[t])`.

  Args:
    x: `[tokens, embed]`.
    choice: the `[E, C]` tokens each expert took and their gates.
    experts: the expert kernels.

  Returns:
    `[tokens, embed]`; 0 for tokens no expert took.
  """
  rows = jnp.take(x, choice.tokens, axis=0)  # [E, C, embed]
  h = jax.nn.silu(jnp.einsum("ecd,edf->ecf", rows, experts.gate)) * jnp.einsum(
      "ecd,edf->ecf", rows, experts.up)
  h = h * choice.gates[..., None].astype(h.dtype)  # the gate applied before `down`
  y = jnp.einsum("ecf,efd->ecd", h, experts.down, preferred_element_type=jnp.float32)
  out = jnp.zeros(x.shape, jnp.float32).at[choice.tokens.reshape(-1)].add(
      y.reshape(-1, x.shape[-1]))
  return out.astype(x.dtype)


# Row blocks of the blocked path, largest first: each expert's rows are covered by as
# many whole blocks of each size as fit, the last size rounding up. A remainder of at
# least FULL_BLOCK_FILL of a block also runs as one whole block, padded: one 1024-row
# matmul on 900 rows is cheaper than 3 of 256 and 3 of 64 (4-6% of the fine-grained
# layer's fwd+bwd time at the OLMoE shape of `benchmarks/moe_layer.py`, timed against the
# previous rule in one process). XLA:CPU matmuls are efficient from ~1024 rows.
BLOCKS = (1024, 256, 64)
FULL_BLOCK_FILL = 7 / 8


def _slack(block: int, last: bool) -> int:
  """Rows a group may be short of a whole block that still runs: `(rows + slack) // block`."""
  return block - 1 if last else block - math.ceil(FULL_BLOCK_FILL * block)


def _overrun(blocks: tuple[int, ...]) -> int:
  """The most rows a group's last block can run past the group's end."""
  return max(_slack(b, i == len(blocks) - 1) for i, b in enumerate(blocks))


def _block_counts(size: int | jax.Array, blocks: tuple[int, ...]) -> list:
  """How many blocks of each size cover a group of `size` rows (an int or int32 scalar)."""
  counts, rest = [], size
  for i, block in enumerate(blocks):
    count = (rest + _slack(block, i == len(blocks) - 1)) // block
    counts.append(count)
    rest = jnp.maximum(rest - count * block, 0)
  return counts


def blocked(x: jax.Array, routing: Routing, experts: Experts,
            blocks: tuple[int, ...] = BLOCKS) -> jax.Array:
  """Sort by expert + a loop over row blocks per expert (fused SwiGLU); no capacity."""
  k = routing.experts.shape[1]
  flat_experts = routing.experts.reshape(-1)  # [T*k]
  n_experts = experts.gate.shape[0]
  order = sort_by_expert(flat_experts, n_experts)
  group_sizes = jnp.bincount(flat_experts, length=n_experts).astype(jnp.int32)
  token = order // k  # the token of each sorted assignment
  weight = jnp.take(routing.weights.reshape(-1), order)
  # No group has more rows than T*k: larger blocks would never run (nor fit).
  blocks = (*(b for b in blocks[:-1] if b <= flat_experts.size), blocks[-1])
  return _blocked_swiglu(x, weight, experts, token, group_sizes, blocks)


def _dot(a: jax.Array, b: jax.Array, a_dim: int, b_dim: int) -> jax.Array:
  """Contracts `a`'s axis `a_dim` with `b`'s axis `b_dim` (2-D), in float32."""
  return lax.dot_general(a, b, (((a_dim,), (b_dim,)), ((), ())),
                         preferred_element_type=jnp.float32)


def _for_each_block(group_sizes: jax.Array, blocks: tuple[int, ...], experts: Experts, carry,
                    acc, step: Callable, finish: Callable = lambda acc: acc):
  """Runs `step` over the row blocks of each group of the sorted assignments, in order.

  Group e's rows `[start, start + size)` are covered by `size // blocks[0]` blocks of
  `blocks[0]` rows, then whole blocks of the next size, and so on; the last size rounds
  up, and so does any size whose remainder fills `FULL_BLOCK_FILL` of a block. The
  group's last block may thus run past its end, by at most `_overrun(blocks)` rows
  (`valid` marks the group's rows).

  Args:
    group_sizes: int32 `[E]` rows per group.
    blocks: block sizes, largest first.
    experts: the kernels; group e's blocks see `(concat(gate[e], up[e]), down[e])`.
    carry: state threaded through all blocks of all groups.
    acc: the initial value of a per-group accumulator.
    step: `(carry, acc, (gate_up, down), lo, block, valid) -> (carry, acc)` for the
      block of rows `[lo, lo + block)`.
    finish: maps a group's final accumulator to its output.

  Returns:
    The final carry and the groups' outputs, stacked.
  """
  starts = jnp.cumsum(group_sizes) - group_sizes

  def group(carry, xs):
    start, size, gate, up, down = xs
    w = (jnp.concatenate([gate, up], axis=-1), down)
    state, first = (carry, acc), start
    for block, count in zip(blocks, _block_counts(size, blocks), strict=True):

      def body(j, state, block=block, first=first):
        lo = first + j * block
        valid = lo + jnp.arange(block) < start + size
        return step(*state, w, lo, block, valid)

      state = lax.fori_loop(0, count, body, state)
      first = first + count * block
    carry, acc_out = state
    return carry, finish(acc_out)

  return lax.scan(group, carry, (starts, group_sizes, *experts))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _blocked_swiglu(x, weight, experts, token, group_sizes, blocks):
  """`out[t] = Σ_i [token_i = t] · weight_i · SwiGLU_{e(i)}(x[t])` over the sorted
  assignments `i`, whose experts `e(i)` are the consecutive groups of `group_sizes`."""
  return _blocked_forward(x, weight, experts, token, group_sizes, blocks)[0]


def _blocked_forward(x, weight, experts, token, group_sizes, blocks):
  """The output and the saved pre-activations `[T*k + pad, 2·mlp]` (gate | up).

  Buffers updated inside the loops are float32: XLA:CPU updates a bfloat16 buffer by
  converting all of it, so a bfloat16 buffer would cost a full copy per block.
  """
  n, pad, f = token.shape[0], _overrun(blocks), experts.gate.shape[-1]
  token, weight = jnp.pad(token, (0, pad)), jnp.pad(weight, (0, pad))

  def step(carry, acc, w, lo, block, valid):
    out, pre = carry
    tok = lax.dynamic_slice_in_dim(token, lo, block)
    gates = jnp.where(valid, lax.dynamic_slice_in_dim(weight, lo, block), 0)[:, None]
    gate_up = _dot(x.at[tok].get(mode="promise_in_bounds"), w[0], 1, 0)
    h = jax.nn.silu(gate_up[:, :f]) * gate_up[:, f:]
    y = _dot((gates * h).astype(x.dtype), w[1], 1, 0)  # the gate applied before `down`
    out = out.at[tok].add(y, mode="promise_in_bounds")
    # Rows past the group belong to later groups, which overwrite them afterwards.
    return (out, lax.dynamic_update_slice_in_dim(pre, gate_up, lo, 0)), acc

  carry = (jnp.zeros(x.shape, jnp.float32), jnp.zeros((n + pad, 2 * f), jnp.float32))
  (out, pre), _ = _for_each_block(group_sizes, blocks, experts, carry, None, step)
  return out.astype(x.dtype), pre


def _blocked_fwd(x, weight, experts, token, group_sizes, blocks):
  out, pre = _blocked_forward(x, weight, experts, token, group_sizes, blocks)
  return out, (x, weight, experts, token, group_sizes, pre)


def _blocked_bwd(blocks, residuals, dout):
  x, weight, experts, token, group_sizes, pre = residuals
  n, pad = token.shape[0], _overrun(blocks)
  _, d, f = experts.gate.shape
  token, weight, dout = jnp.pad(token, (0, pad)), jnp.pad(weight, (0, pad)), dout.astype(x.dtype)
  # Kernel gradients are accumulated with the wider dimension minor, where XLA:CPU's
  # matmuls are faster (1.3x for [512, 352] from 1024 rows), and transposed per group.
  swap_gate_up, swap_down = d > 2 * f, f > d

  def outer(a, b, swap):  # aᵀ b, or its transpose
    return _dot(b, a, 0, 0) if swap else _dot(a, b, 0, 0)

  def step(carry, acc, w, lo, block, valid):
    (dx, dweight), (dgate_up, ddown) = carry, acc
    tok = lax.dynamic_slice_in_dim(token, lo, block)
    gates = jnp.where(valid, lax.dynamic_slice_in_dim(weight, lo, block), 0)[:, None]
    rows = x.at[tok].get(mode="promise_in_bounds")
    dy = dout.at[tok].get(mode="promise_in_bounds")
    gate_up = lax.dynamic_slice_in_dim(pre, lo, block)
    g, u = gate_up[:, :f], gate_up[:, f:]
    sigmoid = jax.nn.sigmoid(g)
    silu = g * sigmoid
    h = silu * u
    dh = _dot(dy, w[1], 1, 1)  # ∂out/∂h at gate 1
    dweight = lax.dynamic_update_slice_in_dim(dweight, jnp.sum(dh * h, axis=1), lo, 0)
    dh = gates * dh
    dgate_up_rows = jnp.concatenate(
        [dh * u * sigmoid * (1 + g * (1 - sigmoid)), dh * silu], axis=1).astype(x.dtype)
    ddown = ddown + outer((gates * h).astype(x.dtype), dy, swap_down)
    dgate_up = dgate_up + outer(rows, dgate_up_rows, swap_gate_up)
    dx = dx.at[tok].add(_dot(dgate_up_rows, w[0], 1, 1), mode="promise_in_bounds")
    return (dx, dweight), (dgate_up, ddown)

  def finish(acc):  # stays float32 (see `_blocked_forward`)
    dgate_up, ddown = acc
    dgate_up = dgate_up.T if swap_gate_up else dgate_up
    return Experts(dgate_up[:, :f], dgate_up[:, f:], ddown.T if swap_down else ddown)

  carry = (jnp.zeros(x.shape, jnp.float32), jnp.zeros((n + pad,), jnp.float32))
  acc = (jnp.zeros((2 * f, d) if swap_gate_up else (d, 2 * f), jnp.float32),
         jnp.zeros((d, f) if swap_down else (f, d), jnp.float32))
  (dx, dweight), dexperts = _for_each_block(group_sizes, blocks, experts, carry, acc, step,
                                            finish)
  dexperts = jax.tree.map(lambda grad, kernel: grad.astype(kernel.dtype), dexperts, experts)
  return dx.astype(x.dtype), dweight[:n].astype(weight.dtype), dexperts, None, None


_blocked_swiglu.defvjp(_blocked_fwd, _blocked_bwd)


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


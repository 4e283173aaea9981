"""Expert parallelism for the dropless dispatch paths: experts sharded over the
"expert" mesh axis, tokens exchanged with all-to-alls inside `jax.shard_map`.

Each device holds a shard of the tokens (split over `parallel.BATCH_AXES`) and
E / n of the experts (n = size of the "expert" axis; expert e lives on shard
e // (E / n)). Per device, with T local tokens routed to k experts each:

  1. sort the T·k assignments by expert: those for each destination shard are
     then contiguous;
  2. write them into a send buffer `[n, C, embed]` with their local expert ids
     (E / n marks an empty slot), C = T·k rows per destination, so that no
     assignment is ever dropped, however unbalanced the routing;
  3. all-to-all over "expert": each shard receives the rows for its experts;
  4. run the local dropless path on them (empty slots carry the id E / n, which the
     dispatch paths skip: their group sizes count only ids below E / n);
  5. all-to-all the outputs back, put each assignment's output back in token order
     and combine the k outputs with the gate weights.

XLA:CPU has no `ragged_all_to_all`, so the buffers are padded: n·T·k rows of
`embed` per device and direction. Inside the map each expert's kernels are whole
(gathered over "fsdp" and "tensor"), and tokens are replicated over "tensor".
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jbtx.models.dispatch import Experts, sort_by_expert
from jbtx.models.routing import Routing
from jbtx.runtime.sharding import BATCH_AXES

LocalDispatch = Callable[[jax.Array, Routing, Experts], jax.Array]


def applies(n_experts: int, n_tokens: int) -> bool:
  """Whether the current mesh (`parallel.sharding_rules`) has an "expert" axis > 1
  that divides the experts, and the batch axes divide the tokens."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.shape.get("expert", 1) == 1:
    return False
  shards = math.prod(mesh.shape[a] for a in BATCH_AXES)
  return n_experts % mesh.shape["expert"] == 0 and n_tokens % shards == 0


def dispatch(x: jax.Array, routing: Routing, experts: Experts,
             local: LocalDispatch) -> jax.Array:
  """`Σ_j w[t, j] · SwiGLU_{e[t, j]}(x[t])` with experts on the "expert" mesh axis.

  Args:
    x: tokens `[T, embed]`.
    routing: experts and gate weights `[T, k]`.
    experts: kernels `[E, embed, mlp]`, `[E, mlp, embed]`.
    local: the single-device dropless path run on each shard's experts.

  Returns:
    `[T, embed]`, equal to `local(x, routing, experts)` without a mesh.
  """
  mesh = jax.sharding.get_abstract_mesh()
  tokens, kernels = P(BATCH_AXES, None), P("expert", None, None)
  exchange = functools.partial(_exchange, local=local, n_shards=mesh.shape["expert"])
  # check_vma=False: the local paths build loop carries (e.g. blocked's accumulators)
  # from constants, which the varying-axes type check would reject.
  return jax.shard_map(exchange, mesh=mesh,
                       in_specs=(tokens, Routing(tokens, tokens), Experts(*[kernels] * 3)),
                       out_specs=tokens, check_vma=False)(x, routing, experts)


def _exchange(x: jax.Array, routing: Routing, experts: Experts, local: LocalDispatch,
              n_shards: int) -> jax.Array:
  """The per-device body of `dispatch`: local tokens `[T, embed]`, local experts."""
  n_tokens, k = routing.experts.shape
  n_local = experts.gate.shape[0]
  rows = n_tokens * k
  flat = routing.experts.reshape(-1)
  order = sort_by_expert(flat, n_local * n_shards)
  expert = flat[order]
  dest = expert // n_local  # destination shard of each sorted assignment, ascending
  counts = jnp.bincount(dest, length=n_shards)
  slot = jnp.arange(rows) - (jnp.cumsum(counts) - counts)[dest]
  send = jnp.zeros((n_shards, rows, x.shape[1]), x.dtype).at[dest, slot].set(x[order // k])
  ids = jnp.full((n_shards, rows), n_local, jnp.int32).at[dest, slot].set(expert % n_local)

  to_experts = functools.partial(jax.lax.all_to_all, axis_name="expert", split_axis=0,
                                 concat_axis=0, tiled=True)
  received, received_ids = to_experts(send), to_experts(ids)
  received_routing = Routing(received_ids.reshape(-1, 1),
                             jnp.ones((n_shards * rows, 1), jnp.float32))
  out = local(received.reshape(n_shards * rows, -1), received_routing, experts)
  back = to_experts(out.reshape(n_shards, rows, -1))  # [n, rows, embed], as sent
  y = jnp.zeros((rows, x.shape[1]), back.dtype).at[order].set(back[dest, slot])
  return jnp.einsum("tkd,tk->td", y.reshape(n_tokens, k, -1), routing.weights.astype(y.dtype))

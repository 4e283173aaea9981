"""The train state, the loss, and the sharded, jit-compiled train and eval steps.

Every array of the state is born sharded (`init_train_state` runs the initialiser
under `jax.jit` with `out_shardings`): parameters as `jbtx.runtime.sharding.AXIS_RULES` say,
their optimizer moments like them, scalars replicated. The steps are `jax.jit`s with
explicit in/out shardings; the train step donates the state. Model code traced by
them sees the mesh and the rule table (`sharding.sharding_rules`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jbtx.config import ConfigError, DataConfig
from jbtx.models.forward import Batch, forward, valid_targets
from jbtx.models.llama import abstract_params, init_params
from jbtx.models.moe import aux_loss
from jbtx.runtime import sharding
from jbtx.training.optimizer import current_learning_rate


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training.

  Attributes:
    step: int32 scalar, batches consumed (skipped non-finite steps included).
    params: the parameter tree.
    opt_state: the optimizer state.
    rng: uint32 `[2]` raw key data (`jax.random.key_data`), folded with `step` to
      seed MoE router noise; raw so that checkpoints hold a plain array.
  """

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


def token_losses(logits: jax.Array, batch: Batch) -> tuple[jax.Array, jax.Array]:
  """Summed next-token cross-entropy over valid targets, and their count.

  A target is valid when it continues the same document as its input token (same
  non-zero segment id), so padding and document boundaries are never predicted.

  Args:
    logits: float `[batch, seq, vocab]`.
    batch: `tokens` and `segment_ids`, int `[batch, seq]`.
  """
  targets = batch["tokens"][:, 1:]
  valid = valid_targets(batch["segment_ids"])
  losses = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], targets)
  return jnp.sum(jnp.where(valid, losses, 0.0)), jnp.sum(valid)


def next_token_loss(logits: jax.Array, batch: Batch) -> tuple[jax.Array, jax.Array]:
  """Mean next-token cross-entropy over valid targets (see `token_losses`), and their count."""
  total, count = token_losses(logits, batch)
  return total / jnp.maximum(count, 1), count


def _initial_state(model: nn.Module, optimizer: optax.GradientTransformation, seed: int):
  """A function `() -> TrainState` (parameters from `seed`, router RNG from `seed + 1`)."""

  def init() -> TrainState:
    params = init_params(model, jax.random.key(seed))
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params),
                      jax.random.key_data(jax.random.key(seed + 1)))

  return init


def train_state_shardings(model: nn.Module, optimizer: optax.GradientTransformation,
                          mesh: Mesh) -> TrainState:
  """A TrainState of `NamedSharding`s: parameters by the rule table, optimizer
  moments like their parameters, everything else (counts, step, rng) replicated."""
  boxed = abstract_params(model)
  params = sharding.param_shardings(boxed, mesh)
  shapes = nn.meta.unbox(boxed)
  replicated = NamedSharding(mesh, P())
  by_path = {_param_path(path): (leaf.shape, sharding) for (path, leaf), sharding in zip(
      jax.tree_util.tree_leaves_with_path(shapes), jax.tree.leaves(params), strict=True)}

  def like_param(path, leaf):
    shape, sharding = by_path.get(_param_path(path), (None, replicated))
    return sharding if shape == leaf.shape else replicated

  opt_state = jax.tree_util.tree_map_with_path(like_param,
                                               jax.eval_shape(optimizer.init, shapes))
  return TrainState(replicated, params, opt_state, replicated)


def _param_path(path: tuple) -> tuple[str, ...]:
  """The parameter a state leaf belongs to: the trailing dict keys of its path.

  Optimizer states wrap copies of the parameter tree (a nested dict) in named
  tuples, e.g. `[0].mu['layers']['attn']['q']['kernel']`.
  """
  keys = []
  for entry in reversed(path):
    if not isinstance(entry, jax.tree_util.DictKey):
      break
    keys.append(entry.key)
  return tuple(reversed(keys))


def abstract_train_state(model: nn.Module, optimizer: optax.GradientTransformation,
                         mesh: Mesh) -> TrainState:
  """The TrainState as `jax.ShapeDtypeStruct`s carrying their shardings (a restore target)."""
  shapes = jax.eval_shape(_initial_state(model, optimizer, 0))
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      shapes, train_state_shardings(model, optimizer, mesh))


def make_init(model: nn.Module, optimizer: optax.GradientTransformation, seed: int,
              mesh: Mesh):
  """`() -> TrainState`, jit-compiled to write every array straight into its sharding."""
  shardings = train_state_shardings(model, optimizer, mesh)
  return jax.jit(_initial_state(model, optimizer, seed), out_shardings=shardings)


def init_train_state(model: nn.Module, optimizer: optax.GradientTransformation, seed: int,
                     mesh: Mesh) -> TrainState:
  """A fresh TrainState, initialised directly into its shardings on `mesh` (`make_init`)."""
  return make_init(model, optimizer, seed, mesh)()


def train_state_from_params(model: nn.Module, optimizer: optax.GradientTransformation,
                           params: Any, seed: int, mesh: Mesh) -> TrainState:
  """A TrainState at step 0 holding `params` (e.g. a seed or a mixed model), with a
  fresh optimizer state, placed into the shardings of `train_state_shardings`.

  Raises:
    ValueError: naming the first tensor whose path or shape is not the model's.
  """
  shardings = train_state_shardings(model, optimizer, mesh)
  expected = nn.meta.unbox(abstract_params(model))
  _check_params(expected, params)

  def init(params):
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params),
                      jax.random.key_data(jax.random.key(seed + 1)))

  dtypes = jax.tree.map(lambda e, p: jnp.asarray(p, e.dtype), expected, params)
  return jax.jit(init, in_shardings=(shardings.params,), out_shardings=shardings)(dtypes)


def _check_params(expected: Any, params: Any) -> None:
  want = {jax.tree_util.keystr(k): v.shape for k, v in
          jax.tree_util.tree_leaves_with_path(expected)}
  got = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in
         jax.tree_util.tree_leaves_with_path(params)}
  for key in sorted(set(want) | set(got)):
    if key not in got:
      raise ValueError(f"the initial parameters lack the tensor {key} of the model")
    if key not in want:
      raise ValueError(f"the initial parameters have a tensor {key} the model does not")
    if want[key] != got[key]:
      raise ValueError(f"tensor {key}: the model has shape {want[key]}, the initial "
                       f"parameters {got[key]}")


def abstract_batch(data: DataConfig, mesh: Mesh) -> dict[str, jax.ShapeDtypeStruct]:
  """A global training batch as shapes: int32 `tokens`, `segment_ids`, `positions`
  `[batch_size, seq_len]`, rows split over the mesh's batch axes (as the loop feeds it).

  Raises:
    ConfigError: ('data.batch_size') if the rows do not split evenly over the mesh.
  """
  sharding.check_batch_rows(mesh, data.batch_size)
  shape = (data.batch_size, data.seq_len)
  rows = sharding.batch_sharding(mesh)
  return {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=rows)
          for k in ("tokens", "segment_ids", "positions")}


def _micro_batches(batch: Batch, n: int) -> Batch:
  """`[batch, seq]` -> `[n, batch / n, seq]`; micro-batch i holds rows i, i + n, ….

  Strided rows keep each micro-batch spread over all batch shards, so the split
  moves no data when a shard's row count is a multiple of `n`.
  """
  rows = next(iter(batch.values())).shape[0]
  if rows % n:
    raise ConfigError("optimizer.grad_accum_steps",
                      f"must divide the global batch ({rows} rows), got {n}")
  split = lambda x: jnp.swapaxes(x.reshape(rows // n, n, *x.shape[1:]), 0, 1)
  return {k: jax.lax.with_sharding_constraint(split(v), P(None, sharding.BATCH_AXES))
          for k, v in batch.items()}


def _all_finite(tree: Any) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def make_train_step(model: nn.Module, optimizer: optax.GradientTransformation, mesh: Mesh,
                    grad_accum_steps: int = 1):
  """`(state, batch) -> (state, metrics)`, jit-compiled for `mesh`, the state donated.

  `batch`: int32 `tokens`, `segment_ids`, `positions` `[global_batch, seq]`. The loss
  is next-token cross-entropy (mean over the batch's valid targets) plus, for MoE
  models, the load-balancing and router z-losses averaged over MoE layers
  (`moe.aux_loss`). With `grad_accum_steps` = n, the batch is split into n
  micro-batches run one after another (`lax.scan`); their cross-entropy gradients
  are weighted by target counts, so the sum equals the full-batch gradient, and the
  auxiliary losses are averaged over micro-batches.

  If the loss or any gradient is non-finite, params and opt_state are returned
  unchanged and `metrics["skipped"]` is 1; `step` advances either way. Metrics:
  loss, aux_loss, grad_norm (before clipping), tokens (valid targets),
  learning_rate, skipped and, for MoE models, load_balance_loss, router_z_loss and
  expert_load `[layers, E]`.
  """
  train_model = model.clone(train=True)
  shardings = train_state_shardings(model, optimizer, mesh)
  n = grad_accum_steps

  def micro_loss(params, micro, rng, step, total):
    logits, stats = forward(train_model, params, micro, rng, step)
    ce_sum, count = token_losses(logits, micro)
    aux = aux_loss(stats, model.config)
    return ce_sum / total + aux / n, (ce_sum, aux, count, stats)

  def gradients(params, batch, rng, step):
    total = jnp.maximum(jnp.sum(valid_targets(batch["segment_ids"])), 1)
    grad_fn = jax.grad(micro_loss, has_aux=True)
    if n == 1:  # No scan: its carried accumulators would cost copies of every gradient.
      grads, (ce_sum, aux, count, stats) = grad_fn(params, batch, rng, step, total)
      return grads, ce_sum / total, aux, count, stats

    def accumulate(acc, micro):
      index, micro_batch = micro
      grads, out = grad_fn(params, micro_batch, jax.random.fold_in(rng, index), step, total)
      return jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc, grads), out

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    zeros = jax.lax.with_sharding_constraint(zeros, shardings.params)
    grads, (ce_sum, aux, count, stats) = jax.lax.scan(
        accumulate, zeros, (jnp.arange(n), _micro_batches(batch, n)))
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    stats = jax.tree.map(lambda v: jnp.mean(v, axis=0), stats)
    return grads, jnp.sum(ce_sum) / total, jnp.mean(aux), jnp.sum(count), stats

  def train_step(state: TrainState, batch: Batch):
    with sharding.sharding_rules(mesh):
      rng = jax.random.fold_in(state.rng, state.step)
      grads, ce, aux, count, stats = gradients(state.params, batch, rng, state.step)
      updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(ce) & jnp.isfinite(aux) & _all_finite(grads)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    metrics = {"loss": ce, "aux_loss": aux, "tokens": count,
               "grad_norm": optax.tree.norm(grads), "skipped": (~finite).astype(jnp.int32)}
    learning_rate = current_learning_rate(opt_state)
    if learning_rate is not None:
      metrics["learning_rate"] = learning_rate
    if stats:
      metrics |= {"load_balance_loss": jnp.mean(stats["load_balance_loss"]),
                  "router_z_loss": jnp.mean(stats["router_z_loss"]),
                  "expert_load": stats["expert_load"]}
    new_state = state.replace(step=state.step + 1, params=keep(params, state.params),
                              opt_state=keep(opt_state, state.opt_state))
    return new_state, metrics

  replicated = NamedSharding(mesh, P())
  return jax.jit(train_step, in_shardings=(shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(shardings, replicated), donate_argnums=0)


def make_eval_step(model: nn.Module, mesh: Mesh, micro_batches: int = 1):
  """`(params, batch) -> (summed loss, target count)`, jit-compiled for `mesh`.

  With `micro_batches` = n the batch's rows run in n slices one after another (as
  the training step's `grad_accum_steps`), so the logits of only `batch / n` rows are
  ever in memory.
  """

  def losses(params, batch):
    return token_losses(forward(model, params, batch)[0], batch)

  def eval_step(params, batch):
    with sharding.sharding_rules(mesh):
      if micro_batches == 1:
        return losses(params, batch)
      sums, counts = jax.lax.map(lambda micro: losses(params, micro),
                                 _micro_batches(batch, micro_batches))
      return jnp.sum(sums), jnp.sum(counts)

  params = sharding.param_shardings(abstract_params(model), mesh)
  replicated = NamedSharding(mesh, P())
  return jax.jit(eval_step, in_shardings=(params, sharding.batch_sharding(mesh)),
                 out_shardings=replicated)

"""Loss and the jit-compiled train and eval steps of a decoder language model."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from jbtx.models.moe import aux_loss, collect_moe_stats

Batch = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training; `rng` seeds MoE router noise per step."""

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


def next_token_loss(logits: jax.Array, batch: Batch) -> tuple[jax.Array, jax.Array]:
  """Mean next-token cross-entropy over valid targets, and their count.

  A target is valid when it continues the same document as its input token (same
  non-zero segment id), so padding and document boundaries are never predicted.

  Args:
    logits: float `[batch, seq, vocab]`.
    batch: `tokens` and `segment_ids`, int `[batch, seq]`.
  """
  targets = batch["tokens"][:, 1:]
  segments = batch["segment_ids"]
  valid = (segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] != 0)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], targets)
  count = jnp.sum(valid)
  return jnp.sum(jnp.where(valid, losses, 0.0)) / jnp.maximum(count, 1), count


def _forward(model: nn.Module, params: Any, batch: Batch, rng: jax.Array | None = None):
  """Logits and the per-layer MoE statistics (empty for a dense model)."""
  logits, state = model.apply(
      {"params": params}, batch["tokens"], positions=batch["positions"],
      segment_ids=batch["segment_ids"], mutable=["intermediates"],
      rngs={"router": rng} if rng is not None else None)
  return logits, collect_moe_stats(state.get("intermediates", {}))


def make_train_step(model: nn.Module, optimizer: optax.GradientTransformation):
  """`(state, batch) -> (state, metrics)`, jit-compiled with the state donated.

  The loss is next-token cross-entropy plus, for MoE models, the load-balancing and
  router z-losses averaged over MoE layers (`moe.aux_loss`). Metrics report each
  part and the per-layer expert load.
  """
  train_model = model.clone(train=True)

  def loss_fn(params, batch, rng):
    logits, stats = _forward(train_model, params, batch, rng)
    ce, count = next_token_loss(logits, batch)
    aux = aux_loss(stats, model.config)
    return ce + aux, (ce, aux, count, stats)

  def train_step(state: TrainState, batch: Batch):
    rng = jax.random.fold_in(state.rng, state.step)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (_, (ce, aux, count, stats)), grads = grad_fn(state.params, batch, rng)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": ce, "aux_loss": aux, "tokens": count,
               "grad_norm": optax.tree.norm(grads)}
    if stats:
      metrics |= {"load_balance_loss": jnp.mean(stats["load_balance_loss"]),
                  "router_z_loss": jnp.mean(stats["router_z_loss"]),
                  "expert_load": stats["expert_load"]}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return jax.jit(train_step, donate_argnums=0)


def make_eval_step(model: nn.Module):
  """`(params, batch) -> (summed loss, target count)`, jit-compiled."""

  def eval_step(params, batch):
    loss, count = next_token_loss(_forward(model, params, batch)[0], batch)
    return loss * count, count

  return jax.jit(eval_step)

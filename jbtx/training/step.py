"""Loss and the jit-compiled train and eval steps of a decoder language model."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

Batch = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training."""

  step: jax.Array
  params: Any
  opt_state: Any


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


def _forward(model: nn.Module, params: Any, batch: Batch) -> jax.Array:
  return model.apply({"params": params}, batch["tokens"], positions=batch["positions"],
                     segment_ids=batch["segment_ids"])


def make_train_step(model: nn.Module, optimizer: optax.GradientTransformation):
  """`(state, batch) -> (state, metrics)`, jit-compiled with the state donated."""

  def loss_fn(params, batch):
    loss, count = next_token_loss(_forward(model, params, batch), batch)
    return loss, count

  def train_step(state: TrainState, batch: Batch):
    (loss, count), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "tokens": count, "grad_norm": optax.global_norm(grads)}
    return TrainState(state.step + 1, params, opt_state), metrics

  return jax.jit(train_step, donate_argnums=0)


def make_eval_step(model: nn.Module):
  """`(params, batch) -> (summed loss, target count)`, jit-compiled."""

  def eval_step(params, batch):
    loss, count = next_token_loss(_forward(model, params, batch), batch)
    return loss * count, count

  return jax.jit(eval_step)

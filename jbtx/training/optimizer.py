"""AdamW with warmup + cosine decay, clipping, weight-decay and freezing masks, and
per-group learning-rate multipliers."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from jbtx.config import OptimizerConfig

_EXPERT_LEAVES = ("gate", "up", "down")
_ROUTER_LEAVES = ("router", "router_hidden", "router_noise")  # the last two: "noisy_mlp"


def learning_rate_schedule(config: OptimizerConfig, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to the peak, then cosine decay to `min_lr_ratio * peak`."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate,
      warmup_steps=config.warmup_steps, decay_steps=max(total_steps, config.warmup_steps + 1),
      end_value=config.learning_rate * config.min_lr_ratio)


def _keys(path) -> tuple[str, ...]:
  return tuple(getattr(p, "key", str(p)) for p in path)


def weight_decay_mask(params: Any) -> Any:
  """True for every weight matrix; False for norm scales (leaves named "scale")."""
  return jax.tree_util.tree_map_with_path(lambda path, _: _keys(path)[-1] != "scale", params)


def parameter_group(path: tuple[str, ...]) -> str:
  """"router", "experts" (routed and shared expert FFNs of MoE layers) or "other"."""
  if "moe" not in path:
    return "other"
  if path[-1] in _ROUTER_LEAVES:
    return "router"
  return "experts" if path[-1] in _EXPERT_LEAVES or "shared" in path else "other"


def trainable_mask(params: Any, freeze: str) -> Any:
  """True for the parameters `freeze` leaves trainable.

  "none": all. "experts": everything but the expert FFNs (BTX's frozen-experts
  ablation). "all_but_router": only the routers (router warm-up after mixing).
  """
  frozen = {"none": (), "experts": ("experts",), "all_but_router": ("experts", "other")}
  if freeze not in frozen:
    raise ValueError(f"config key 'optimizer.freeze': unknown value {freeze!r}")
  return jax.tree_util.tree_map_with_path(
      lambda path, _: parameter_group(_keys(path)) not in frozen[freeze], params)


def scale_by_group(multipliers: dict[str, float]) -> optax.GradientTransformation:
  """Multiplies the updates of each `parameter_group` by `multipliers[group]` (default 1)."""

  def update(updates, state, params=None):
    del params
    scaled = jax.tree_util.tree_map_with_path(
        lambda path, u: u * multipliers.get(parameter_group(_keys(path)), 1.0), updates)
    return scaled, state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def stored_as(inner: optax.GradientTransformation, dtype: Any) -> optax.GradientTransformation:
  """`inner` with its floating-point state stored as `dtype` and updated in float32."""

  def cast(tree: Any, to: Any) -> Any:
    return jax.tree.map(lambda x: x.astype(to) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                        tree)

  def update(updates, state, params=None):
    updates, state = inner.update(updates, cast(state, jnp.float32), params)
    return updates, cast(state, dtype)

  return optax.GradientTransformation(lambda params: cast(inner.init(params), dtype), update)


def make_optimizer(config: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
  """The AdamW chain; frozen parameters get zero updates and no optimizer state.

  AdamW is written out (`scale_by_adam`, decoupled decay, learning rate) so that the
  learning rate is recorded in the state (`current_learning_rate`) and the group
  multipliers scale the whole step, decay included.
  """
  multipliers = {"router": config.router_lr_multiplier, "experts": config.experts_lr_multiplier}
  adam = optax.scale_by_adam(b1=config.b1, b2=config.b2, eps=config.eps)
  if config.moment_dtype != "float32":
    adam = stored_as(adam, jnp.dtype(config.moment_dtype))
  adamw = optax.chain(
      optax.clip_by_global_norm(config.grad_clip_norm),
      adam,
      optax.add_decayed_weights(config.weight_decay, mask=weight_decay_mask),
      optax.inject_hyperparams(optax.scale_by_learning_rate)(
          learning_rate=learning_rate_schedule(config, total_steps)),
      scale_by_group(multipliers),
  )
  if config.freeze == "none":
    return adamw
  labels = lambda params: jax.tree.map(
      lambda trainable: "train" if trainable else "freeze",
      trainable_mask(params, config.freeze))
  return optax.multi_transform({"train": adamw, "freeze": optax.set_to_zero()}, labels)


def current_learning_rate(opt_state: Any) -> jax.Array | None:
  """The learning rate (before group multipliers) of the last update that produced the
  `make_optimizer` state `opt_state`; None for states that record none."""
  return optax.tree_utils.tree_get(opt_state, "learning_rate",
                                   filtering=lambda _, value: not hasattr(value, "count"))

"""AdamW with warmup + cosine decay, clipping, weight-decay and freezing masks."""

from __future__ import annotations

from typing import Any

import jax
import optax

from jbtx.config import OptimizerConfig

_EXPERT_LEAVES = ("gate", "up", "down")


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
  if path[-1] == "router":
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


def make_optimizer(config: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
  """The AdamW chain; frozen parameters get zero updates and no optimizer state."""
  adamw = optax.chain(
      optax.clip_by_global_norm(config.grad_clip_norm),
      optax.adamw(learning_rate_schedule(config, total_steps), b1=config.b1, b2=config.b2,
                  eps=config.eps, weight_decay=config.weight_decay, mask=weight_decay_mask),
  )
  if config.freeze == "none":
    return adamw
  labels = lambda params: jax.tree.map(
      lambda trainable: "train" if trainable else "freeze",
      trainable_mask(params, config.freeze))
  return optax.multi_transform({"train": adamw, "freeze": optax.set_to_zero()}, labels)

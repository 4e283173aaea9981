"""AdamW with warmup + cosine decay, global-norm clipping and a weight-decay mask."""

from __future__ import annotations

from typing import Any

import jax
import optax

from jbtx.config import OptimizerConfig

# Parameter leaf names that are matrices and get weight decay; norm scales do not.
_DECAYED = ("kernel", "embedding")


def learning_rate_schedule(config: OptimizerConfig, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to the peak, then cosine decay to `min_lr_ratio * peak`."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate,
      warmup_steps=config.warmup_steps, decay_steps=max(total_steps, config.warmup_steps + 1),
      end_value=config.learning_rate * config.min_lr_ratio)


def weight_decay_mask(params: Any) -> Any:
  """True for leaves named "kernel" or "embedding", False for norm scales."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], "key", None) in _DECAYED, params)


def make_optimizer(config: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(config.grad_clip_norm),
      optax.adamw(learning_rate_schedule(config, total_steps), b1=config.b1, b2=config.b2,
                  eps=config.eps, weight_decay=config.weight_decay, mask=weight_decay_mask),
  )

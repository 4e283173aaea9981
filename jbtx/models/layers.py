"""Building blocks shared by the dense and MoE decoders.

Every parameter carries logical axis names (`nn.with_logical_partitioning`); `parallel.py`
maps them to mesh axes. Parameter axis names:

  vocab, embed, q_heads, kv_heads, head_dim, mlp, norm, layers

Activation axis names carry an `act_` prefix (act_batch, act_length, act_embed, …) so
that parameters and activations can be sharded differently by one rule table.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jbtx.config import ModelConfig

Axes = tuple[str, ...]


def dtype_of(name: str) -> jnp.dtype:
  return jnp.dtype(name)


def kernel_init(config: ModelConfig, axes: Axes) -> nn.initializers.Initializer:
  """Normal(0, init_std) initialiser tagged with logical `axes`."""
  return nn.with_logical_partitioning(nn.initializers.normal(config.init_std), axes)


class Dense(nn.Module):
  """Contracts the last `len(in_shape)` input axes with a kernel `[*in_shape, *out_shape]`.

  Attributes:
    config: model config (dtypes, initialiser).
    in_shape: trailing input dimensions to contract, e.g. `(n_heads, head_dim)`.
    out_shape: output dimensions, e.g. `(n_heads, head_dim)`.
    axes: logical axis names of the kernel, one per kernel dimension.
  """

  config: ModelConfig
  in_shape: Sequence[int]
  out_shape: Sequence[int]
  axes: Axes

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    kernel = self.param("kernel", kernel_init(cfg, self.axes),
                        (*self.in_shape, *self.out_shape), dtype_of(cfg.param_dtype))
    n_in = len(self.in_shape)
    token_shape = x.shape[:x.ndim - n_in]
    # One token axis, so the weight gradient contracts a single axis: contracting
    # [batch, seq] together makes XLA:CPU transpose the output gradient first, which
    # doubled a SwiGLU's forward+backward time at d_model 128.
    tokens = x.reshape(-1, *self.in_shape)
    dims = ((tuple(range(1, n_in + 1)), tuple(range(n_in))), ((), ()))
    dtype = dtype_of(cfg.dtype)
    y = jax.lax.dot_general(tokens.astype(dtype), kernel.astype(dtype), dims)
    return y.reshape(*token_shape, *self.out_shape)


class RMSNorm(nn.Module):
  """Root-mean-square norm, computed in float32 as Llama-2 and Hugging Face do."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (x.shape[-1],), dtype_of(cfg.param_dtype))
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + cfg.norm_eps)
    dtype = dtype_of(cfg.dtype)
    return scale.astype(dtype) * normed.astype(dtype)


class Embed(nn.Module):
  """Token embedding table `[vocab, embed]`."""

  config: ModelConfig

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    """int tokens `[batch, seq]` -> embeddings `[batch, seq, embed]` in the compute dtype."""
    cfg = self.config
    table = self.param("embedding", kernel_init(cfg, ("vocab", "embed")),
                       (cfg.vocab_size, cfg.d_model), dtype_of(cfg.param_dtype))
    return jnp.take(table.astype(dtype_of(cfg.dtype)), tokens, axis=0)


class MLP(nn.Module):
  """SwiGLU feed-forward: `down(silu(gate(x)) * up(x))`."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """`[batch, seq, embed]` -> `[batch, seq, embed]`."""
    cfg = self.config
    gate = Dense(cfg, (cfg.d_model,), (cfg.d_ff,), ("embed", "mlp"), name="gate")(x)
    up = Dense(cfg, (cfg.d_model,), (cfg.d_ff,), ("embed", "mlp"), name="up")(x)
    hidden = constrain(nn.silu(gate) * up, ("act_batch", "act_length", "act_mlp"))
    return Dense(cfg, (cfg.d_ff,), (cfg.d_model,), ("mlp", "embed"), name="down")(hidden)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding, "rotate-half" convention.

  Feature i of the first half of each head is rotated together with feature
  i + head_dim/2 by the angle `position * theta**(-2i/head_dim)`. This is the layout
  of Hugging Face's Llama (and GPT-NeoX); Meta's original checkpoints rotate adjacent
  pairs instead, so their q/k projections are permuted on import (`interop/meta_llama`).

  Args:
    x: queries or keys `[batch, seq, heads, head_dim]`.
    positions: integer positions `[batch, seq]`.
    theta: frequency base (`rope_theta`).

  Returns:
    `x` rotated, same shape and dtype; the rotation itself runs in float32.
  """
  half = x.shape[-1] // 2
  inv_freq = 1.0 / (theta ** (jnp.arange(0, half, dtype=jnp.float32) * 2 / x.shape[-1]))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [batch, seq, half]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
  """Positions that restart at 0 at each new segment of a packed row.

  Args:
    segment_ids: int `[batch, seq]`, equal ids for tokens of one document, documents
      contiguous.

  Returns:
    int32 `[batch, seq]`, e.g. segments `[1 1 1 2 2 3]` -> positions `[0 1 2 0 1 0]`.
  """
  index = jnp.arange(segment_ids.shape[-1], dtype=jnp.int32)
  is_start = jnp.concatenate(
      [jnp.ones_like(segment_ids[:, :1], dtype=bool), segment_ids[:, 1:] != segment_ids[:, :-1]],
      axis=-1)
  start = jax.lax.cummax(jnp.where(is_start, index, 0), axis=1)
  return index - start


def constrain(x: jax.Array, axes: Axes) -> jax.Array:
  """Annotates an activation with logical axes (a no-op outside a mesh)."""
  return nn.with_logical_constraint(x, axes)

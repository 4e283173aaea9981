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

from jbtx.config import ModelConfig, RopeScalingConfig

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
    use_bias: add a bias `[*out_shape]` (zero-initialised; the output axes' names).
  """

  config: ModelConfig
  in_shape: Sequence[int]
  out_shape: Sequence[int]
  axes: Axes
  use_bias: bool = False

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
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                             self.axes[n_in:]),
                        tuple(self.out_shape), dtype_of(cfg.param_dtype))
      y = y + bias.astype(dtype)
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
  """Token embedding table `[vocab, embed]`; with tied embeddings also the output layer."""

  config: ModelConfig

  def setup(self):
    cfg = self.config
    self.embedding = self.param("embedding", kernel_init(cfg, ("vocab", "embed")),
                                (cfg.vocab_size, cfg.d_model), dtype_of(cfg.param_dtype))

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """int tokens `[batch, seq]` -> embeddings `[batch, seq, embed]` in the compute dtype."""
    return jnp.take(self.embedding.astype(dtype_of(self.config.dtype)), tokens, axis=0)

  def attend(self, x: jax.Array) -> jax.Array:
    """`[batch, seq, embed]` -> logits `[batch, seq, vocab]` = `x @ embedding.T`, in the
    compute dtype as `Dense` computes an untied output layer (one token axis)."""
    dtype = dtype_of(self.config.dtype)
    tokens = x.reshape(-1, x.shape[-1]).astype(dtype)
    y = jax.lax.dot_general(tokens, self.embedding.astype(dtype), (((1,), (1,)), ((), ())))
    return y.reshape(*x.shape[:-1], self.config.vocab_size)


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


def rope_frequencies(head_dim: int, theta: float,
                     scaling: RopeScalingConfig | None = None) -> jax.Array:
  """Rotary inverse frequencies `theta**(-2i/head_dim)`, float32 `[head_dim / 2]`,
  scaled as `scaling` says (see `RopeScalingConfig`; transformers' formulas, in float32)."""
  half = head_dim // 2
  inv_freq = 1.0 / (theta ** (jnp.arange(0, half, dtype=jnp.float32) * 2 / head_dim))
  if scaling is None or scaling.rope_type == "default":
    return inv_freq
  if scaling.rope_type == "linear":
    return inv_freq / scaling.factor
  original, factor = scaling.original_max_position_embeddings, scaling.factor
  low, high = scaling.low_freq_factor, scaling.high_freq_factor
  wavelen = 2 * jnp.pi / inv_freq
  scaled = jnp.where(wavelen > original / low, inv_freq / factor, inv_freq)
  smooth = (original / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= original / high) & (wavelen <= original / low)
  return jnp.where(medium, smoothed, scaled)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float,
               scaling: RopeScalingConfig | None = None) -> jax.Array:
  """Rotary position embedding, "rotate-half" convention.

  Feature i of the first half of each head is rotated together with feature
  i + head_dim/2 by the angle `position * theta**(-2i/head_dim)` (the frequency scaled
  by `scaling`, see `rope_frequencies`). This is the layout of Hugging Face's Llama (and
  GPT-NeoX); Meta's original checkpoints rotate adjacent pairs instead, so their q/k
  projections are permuted on import (`interop/meta_llama`).

  Args:
    x: queries or keys `[batch, seq, heads, head_dim]`.
    positions: integer positions `[batch, seq]`.
    theta: frequency base (`rope_theta`).
    scaling: frequency scaling (`rope_scaling`); None for none.

  Returns:
    `x` rotated, same shape and dtype; the rotation itself runs in float32.
  """
  inv_freq = rope_frequencies(x.shape[-1], theta, scaling)
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

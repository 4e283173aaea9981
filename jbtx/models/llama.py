"""The dense Llama-2 decoder as pure-functional Flax Linen modules.

    tokens [batch, seq] -> Embed -> n_layers x Block -> RMSNorm -> lm_head -> logits

Block = x + Attention(RMSNorm(x)); x + MLP(RMSNorm(x)). Attention is grouped-query
(`n_kv_heads` ≤ `n_heads`) with rotary embeddings, a causal mask and, for packed rows,
a segment mask so that no token attends across documents. The output layer is its own
"lm_head", or with `tie_embeddings` the embedding table itself. Optional features of
real checkpoints: biases on the attention projections (Qwen2's q/k/v, Llama's
`attention_bias`), and rotary frequency scaling (Llama-3's "llama3", "linear").

Incremental decoding: a model built with `decode=True` keeps a key/value cache in the
"cache" collection (see `jbtx.inference.generate`). Each call appends its tokens at the
cache index and attends to everything cached so far, except slots written with
segment id 0 (the padding of right-padded prompts prefilled in one call).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jbtx.config import ModelConfig
from jbtx.models.layers import (
    MLP,
    Dense,
    Embed,
    RMSNorm,
    apply_rope,
    constrain,
    positions_from_segments,
)
from jbtx.models.moe import MoE

_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def attention_mask(segment_ids: jax.Array | None, seq_len: int) -> jax.Array:
  """Causal mask, intersected with "same segment" for packed rows.

  Returns:
    bool `[batch or 1, 1, seq, seq]`, True where query i may attend to key j.
  """
  index = jnp.arange(seq_len)
  mask = (index[:, None] >= index[None, :])[None, None]
  if segment_ids is not None:
    mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
  return mask


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                          mask: jax.Array) -> jax.Array:
  """Grouped-query attention with float32 softmax.

  Args:
    q: `[batch, q_len, n_heads, head_dim]`.
    k, v: `[batch, kv_len, n_kv_heads, head_dim]`.
    mask: bool, broadcastable to `[batch, 1, q_len, kv_len]`.

  Returns:
    `[batch, q_len, n_heads, head_dim]` in the dtype of `v`.
  """
  batch, q_len, n_heads, head_dim = q.shape
  n_kv = k.shape[2]
  q = q.reshape(batch, q_len, n_kv, n_heads // n_kv, head_dim)
  scores = jnp.einsum("bqhgd,bkhd->bhgqk", q, k, preferred_element_type=jnp.float32)
  scores = scores / jnp.sqrt(jnp.float32(head_dim))
  scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bhgqk,bkhd->bqhgd", probs, v)
  return out.reshape(batch, q_len, n_heads, head_dim)


class Attention(nn.Module):
  """Multi-head / grouped-query self-attention with rotary embeddings."""

  config: ModelConfig
  decode: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array,
               segment_ids: jax.Array | None) -> jax.Array:
    """`[batch, seq, embed]` -> `[batch, seq, embed]`."""
    cfg = self.config
    d, hd = cfg.d_model, cfg.head_dim
    qkv_bias = cfg.attention_bias != "none"
    q = Dense(cfg, (d,), (cfg.n_heads, hd), ("embed", "q_heads", "head_dim"), qkv_bias,
              name="q")(x)
    k = Dense(cfg, (d,), (cfg.n_kv_heads, hd), ("embed", "kv_heads", "head_dim"), qkv_bias,
              name="k")(x)
    v = Dense(cfg, (d,), (cfg.n_kv_heads, hd), ("embed", "kv_heads", "head_dim"), qkv_bias,
              name="v")(x)
    if cfg.qk_norm:  # OLMoE: normalise the full q and k width, then split heads.
      q = RMSNorm(cfg, name="q_norm")(q.reshape(*q.shape[:2], -1)).reshape(q.shape)
      k = RMSNorm(cfg, name="k_norm")(k.reshape(*k.shape[:2], -1)).reshape(k.shape)
    q = constrain(apply_rope(q, positions, cfg.rope_theta, cfg.rope_scaling),
                  ("act_batch", "act_length", "act_q_heads", "act_head_dim"))
    k = constrain(apply_rope(k, positions, cfg.rope_theta, cfg.rope_scaling),
                  ("act_batch", "act_length", "act_kv_heads", "act_head_dim"))
    if self.decode:
      k, v, mask = self._update_cache(k, v, segment_ids)
    else:
      mask = attention_mask(segment_ids, x.shape[1])
    out = dot_product_attention(q, k, v, mask)
    out = constrain(out, ("act_batch", "act_length", "act_q_heads", "act_head_dim"))
    return Dense(cfg, (cfg.n_heads, hd), (d,), ("q_heads", "head_dim", "embed"),
                 cfg.attention_bias == "qkvo", name="o")(out)

  def _update_cache(self, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None):
    """Writes `k, v [batch, q_len, kv, hd]` at the cache index; returns the full cache.

    The cache length is the sequence length of the input the cache was initialised
    with (`jbtx.inference.generate.init_cache`). Slots written with segment id 0 (the
    padding of right-padded prompts prefilled together) are never attended to; None
    marks every new slot valid. Returns cached keys and values `[batch, cache_len, kv,
    hd]` and the mask `[batch, 1, q_len, cache_len]`.
    """
    is_initialized = self.has_variable("cache", "key")
    cached_k = self.variable("cache", "key", jnp.zeros, k.shape, k.dtype)
    cached_v = self.variable("cache", "value", jnp.zeros, v.shape, v.dtype)
    valid = self.variable("cache", "valid", jnp.zeros, k.shape[:2], jnp.bool_)
    index = self.variable("cache", "index", lambda: jnp.array(0, jnp.int32))
    cache_len = cached_k.value.shape[1]
    q_len = k.shape[1]
    if not is_initialized:  # Shape-only initialisation call: nothing to write yet.
      return k, v, attention_mask(None, q_len)
    start = index.value
    cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k, (0, start, 0, 0))
    cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v, (0, start, 0, 0))
    written = (jnp.ones(k.shape[:2], jnp.bool_) if segment_ids is None
               else segment_ids != 0)
    valid.value = jax.lax.dynamic_update_slice(valid.value, written, (0, start))
    index.value = start + q_len
    # The cache is a loop carry of decoding: pin its layout (rows over the batch axes,
    # heads over tensor) so the compiler never gathers it.
    kv_axes = ("act_batch", "act_length", "act_kv_heads", "act_head_dim")
    cached_k.value = constrain(cached_k.value, kv_axes)
    cached_v.value = constrain(cached_v.value, kv_axes)
    valid.value = constrain(valid.value, kv_axes[:2])
    query_index = start + jnp.arange(q_len)
    causal = jnp.arange(cache_len)[None, :] <= query_index[:, None]  # [q_len, cache_len]
    return cached_k.value, cached_v.value, causal[None, None] & valid.value[:, None, None]


class Block(nn.Module):
  """One pre-norm decoder block. Returns `(x, None)` so it can be the body of `nn.scan`.

  Attributes:
    config: model config.
    decode: use the KV cache.
    train: training mode (MoE router noise).
    use_moe: the feed-forward is an MoE layer ("moe") instead of a SwiGLU ("mlp").
  """

  config: ModelConfig
  decode: bool = False
  train: bool = False
  use_moe: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None,
               step: jax.Array | None = None):
    cfg = self.config
    h = RMSNorm(cfg, name="attn_norm")(x)
    x = x + Attention(cfg, self.decode, name="attn")(h, positions, segment_ids)
    h = RMSNorm(cfg, name="mlp_norm")(x)
    if self.use_moe:
      x = x + MoE(cfg, self.train, name="moe")(h, step)
    else:
      x = x + MLP(cfg, name="mlp")(h)
    return constrain(x, ("act_batch", "act_length", "act_embed")), None


class BlockGroup(nn.Module):
  """`moe.every` consecutive blocks, the last with an MoE FFN: `block_0 … block_{n-1}`."""

  config: ModelConfig
  decode: bool = False
  train: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None,
               step: jax.Array | None = None):
    every = self.config.moe.every
    for j in range(every):
      x, _ = Block(self.config, self.decode, self.train, use_moe=j == every - 1,
                   name=f"block_{j}")(x, positions, segment_ids, step)
    return x, None


def block_stack(block_cls: type[nn.Module], config: ModelConfig) -> type[nn.Module]:
  """`block_cls` wrapped with the config's remat policy and, if `scan_layers`, `nn.scan`.

  With scanning, parameters (and KV caches) gain a leading "layers" axis of size
  `n_layers`; the returned class is then called once for all layers.
  """
  if config.remat_policy != "none":
    block_cls = nn.remat(block_cls, policy=_REMAT_POLICIES[config.remat_policy],
                         prevent_cse=not config.scan_layers)
  if not config.scan_layers:
    return block_cls
  return nn.scan(
      block_cls,
      variable_axes={"params": 0, "cache": 0, "intermediates": 0},
      split_rngs={"params": True, "router": True},
      in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
      length=n_layer_groups(config),
      metadata_params={nn.PARTITION_NAME: "layers"},
  )


def n_layer_groups(config: ModelConfig) -> int:
  """Number of repeated units: layers, or groups of `moe.every` layers."""
  return config.n_layers // (config.moe.every if config.moe else 1)


def block_unit(config: ModelConfig, decode: bool, train: bool, name: str) -> nn.Module:
  """The repeated unit of the decoder: a Block (dense or all-MoE) or a BlockGroup."""
  moe = config.moe
  if moe is not None and moe.every > 1:
    return block_stack(BlockGroup, config)(config, decode, train, name=name)
  return block_stack(Block, config)(config, decode, train, use_moe=moe is not None, name=name)


class Llama(nn.Module):
  """Dense Llama-2 decoder: int tokens `[batch, seq]` -> float32 logits `[batch, seq, vocab]`.

  Attributes:
    config: the model shape and numerics.
    decode: build the incremental-decoding variant that reads and writes a KV cache.
    train: training mode: MoE router jitter and Gumbel sampling use the "router" RNG.
  """

  config: ModelConfig
  decode: bool = False
  train: bool = False

  @nn.compact
  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None, step: jax.Array | None = None
               ) -> jax.Array:
    """Runs the decoder.

    Args:
      tokens: int `[batch, seq]`.
      positions: int `[batch, seq]` rotary positions; by default `0..seq-1`, or
        restarting at each document when `segment_ids` is given. Required when
        decoding (the position of each new token in its sequence).
      segment_ids: int `[batch, seq]` document ids of packed rows (tokens attend only
        within their document); None for one document per row.
      step: the training step (int scalar), for schedules inside the model (the
        Gumbel temperature of "sample_top1" routing); None outside training.

    Returns:
      float32 logits `[batch, seq, vocab]`.
    """
    cfg = self.config
    if self.decode and cfg.moe is not None and cfg.moe.routing == "expert_choice":
      raise ValueError("expert_choice routing is not causal (each expert picks among all "
                       "tokens of a group), so it cannot decode incrementally")
    if positions is None:
      if self.decode:
        raise ValueError("positions are required when decoding with a KV cache")
      if segment_ids is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
      else:
        positions = positions_from_segments(segment_ids)
    embed = Embed(cfg, name="embed")
    x = constrain(embed(tokens), ("act_batch", "act_length", "act_embed"))
    x = self.run_blocks(x, positions, segment_ids, step)
    x = RMSNorm(cfg, name="final_norm")(x)
    if cfg.tie_embeddings:
      logits = embed.attend(x)
    else:
      logits = Dense(cfg, (cfg.d_model,), (cfg.vocab_size,), ("embed", "vocab"),
                     name="lm_head")(x)
    return constrain(logits.astype(jnp.float32), ("act_batch", "act_length", "act_vocab"))

  def run_blocks(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None,
                 step: jax.Array | None = None) -> jax.Array:
    """Applies the blocks, scanned (params under "layers") or unrolled ("layers_{i}")."""
    cfg = self.config
    if cfg.scan_layers:
      x, _ = block_unit(cfg, self.decode, self.train, "layers")(x, positions, segment_ids, step)
      return x
    for i in range(n_layer_groups(cfg)):
      unit = block_unit(cfg, self.decode, self.train, f"layers_{i}")
      x, _ = unit(x, positions, segment_ids, step)
    return x


def abstract_params(model: Llama):
  """The boxed parameter tree of `model` as shapes only (`nn.LogicallyPartitioned` leaves)."""
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), tokens))["params"]


def init_params(model: Llama, rng: jax.Array):
  """Fresh parameters of `model`, unboxed (a plain nested dict of arrays)."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  return nn.meta.unbox(model.init(rng, tokens)["params"])



def stack_layers(params: dict, n_units: int) -> dict:
  """Unrolled parameters (`layers_0 … layers_{n-1}`) -> the scanned layout ("layers",
  every leaf with a leading `[n_units]` axis), as host numpy arrays."""
  units = [params[f"layers_{i}"] for i in range(n_units)]
  rest = {k: v for k, v in params.items() if not k.startswith("layers_")}
  return rest | {"layers": jax.tree.map(lambda *leaves: np.stack(leaves), *units)}


def unstack_layers(params: dict) -> dict:
  """The scanned layout -> unrolled parameters (inverse of `stack_layers`)."""
  stacked = params["layers"]
  n_units = jax.tree.leaves(stacked)[0].shape[0]
  rest = {k: v for k, v in params.items() if k != "layers"}
  return rest | {f"layers_{i}": jax.tree.map(lambda leaf, i=i: leaf[i], stacked)
                 for i in range(n_units)}

"""The Mixture-of-Experts feed-forward layer.

    x [batch, seq, embed] -> router (float32 logits [tokens, E]) -> routing (experts,
    gate values) -> dispatch to SwiGLU experts -> output_scale · Σ_j g_j · FF_j(x)
    (+ shared experts, not scaled)

Parameters of the module (named "moe" in a block), with logical axes:

    router   [embed, expert]
    router_hidden [None, expert]      router_noise [embed, expert]   ("noisy_mlp" only)
    gate     [expert, embed, mlp]      up   [expert, embed, mlp]
    down     [expert, mlp, embed]
    shared/{gate,up,down}/kernel       a dense SwiGLU of width n_shared_experts · d_ff

A dense FFN's kernels stack straight into the expert kernels (`jnp.stack` on axis 0).

Per-layer auxiliary values are sown into the "intermediates" collection under
"moe_stats" (load_balance_loss, router_z_loss, expert_load [E], router_entropy,
top1_gate, dropped_fraction) and "router_logits"; `collect_moe_stats` and
`collect_router_logits` gather them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jbtx.config import ModelConfig
from jbtx.models import dispatch, expert_parallel, routing
from jbtx.models.layers import MLP, dtype_of, kernel_init
from jbtx.runtime import sharding


def dispatch_path(config: ModelConfig) -> str:
  """The dispatch implementation "auto" resolves to.

  Switch routing is defined with a capacity (tokens over it are dropped), soft routing
  uses every expert (dense is exact and cheapest), expert-choice routing has its own
  path (every expert on exactly the tokens it took). Otherwise an exact dropless path:
  "dropless" (`ragged_dot`, grouped-matmul kernels on GPU and TPU), except on CPU,
  where XLA runs `ragged_dot` as a masked product with every expert and "blocked" is
  the fastest. `benchmarks/moe_layer.py` on a 2-core CPU, float32, 8192 tokens,
  d_model 512, fwd+bwd time over a dense SwiGLU of width k·d_ff (noise ~±0.1):

      E=8,  k=2, d_ff=1408: blocked 1.10  dropless 10.1  capacity 2.8  dense 4.9
      E=64, k=8, d_ff=176:  blocked 1.41  dropless ~14 GB of masks  capacity 8.1  dense 8.5

  (GPU and TPU not measured.)
  """
  moe = config.moe
  if moe.dispatch != "auto":
    return moe.dispatch
  if moe.routing == "switch":
    return "capacity"
  if moe.routing == "soft":
    return "dense"
  if moe.routing == "expert_choice":
    return "expert_choice"
  return "blocked" if sharding.target_platform() == "cpu" else "dropless"


class MoE(nn.Module):
  """Routed SwiGLU experts: `[batch, seq, embed]` -> `[batch, seq, embed]`.

  Attributes:
    config: model config with `moe` set.
    train: training mode: router jitter, Gumbel sampling and the "noisy_mlp" gate's
      noise draw from the "router" RNG.
  """

  config: ModelConfig
  train: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, step: jax.Array | None = None) -> jax.Array:
    """Routes `x [batch, seq, embed]`; `step` anneals the Gumbel temperature in training."""
    cfg, moe = self.config, self.config.moe
    n_experts, d, f = moe.n_experts, cfg.d_model, moe.d_ff or cfg.d_ff
    param_dtype, dtype = dtype_of(cfg.param_dtype), dtype_of(cfg.dtype)
    tokens = jnp.asarray(x).reshape(-1, d)  # a NumPy x would reach dispatch eagerly

    router_in = tokens.astype(jnp.float32)
    if self.train and moe.router_jitter > 0:
      noise = jax.random.uniform(self.make_rng("router"), router_in.shape, jnp.float32,
                                 1.0 - moe.router_jitter, 1.0 + moe.router_jitter)
      router_in = router_in * noise
    logits, load = self._router_logits(router_in)  # [T, E], always float32
    taken = None  # expert-choice routing's [E, C] form
    if moe.routing == "expert_choice":
      taken = routing.expert_choice(logits, moe)
      choice = routing.expert_choice_routing(taken, len(tokens))
    else:
      sample_rng = (self.make_rng("router")
                    if self.train and moe.routing == "sample_top1" else None)
      choice = routing.route(logits, moe, sample_rng, routing.gumbel_temperature(moe, step))

    def expert_kernel(name, shape, axes):
      return self.param(name, kernel_init(cfg, axes), shape, param_dtype).astype(dtype)

    experts = dispatch.Experts(
        gate=expert_kernel("gate", (n_experts, d, f), ("expert", "embed", "mlp")),
        up=expert_kernel("up", (n_experts, d, f), ("expert", "embed", "mlp")),
        down=expert_kernel("down", (n_experts, f, d), ("expert", "mlp", "embed")))
    if taken is None:
      y, dropped = self._dispatch(tokens.astype(dtype), choice, experts)
    else:  # dispatch "loop" and "dense" take the token-major form too (tests, oracle).
      y = (dispatch.expert_choice(tokens.astype(dtype), taken, experts)
           if dispatch_path(cfg) == "expert_choice"
           else self._dispatch(tokens.astype(dtype), choice, experts)[0])
      dropped = routing.untaken_fraction(taken, len(tokens))
    if moe.output_scale != 1.0:
      y = y * jnp.asarray(moe.output_scale, y.dtype)
    if moe.n_shared_experts:
      shared_cfg = dataclasses.replace(cfg, d_ff=moe.n_shared_experts * f, moe=None)
      # On `[batch, seq, embed]`: the MLP's activation constraints name those axes.
      y = y + MLP(shared_cfg, name="shared")(x.astype(dtype)).reshape(y.shape)

    balance = routing.load_balance_loss(logits, choice, moe.load_balance, load)
    stats = {"load_balance_loss": balance,
             "router_z_loss": routing.router_z_loss(logits), "dropped_fraction": dropped,
             **routing.router_metrics(logits, choice)}
    self.sow("intermediates", "moe_stats", stats)
    self.sow("intermediates", "router_logits", logits)
    return y.reshape(x.shape).astype(dtype)

  def _router_logits(self, x: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """Float32 router logits `[T, E]` of tokens `x [T, embed]`, and a load `[E]` or None.

    "linear": `x W`. "noisy_mlp" (LLaMA-MoE): `tanh(x W) W_h`, plus in training the
    noise `N(0, 1) · (softplus(x W_noise) + 0.01)`; with k < E the load is then
    Shazeer's smooth estimate (`routing.smooth_load`), for the "cv" balance loss.
    """
    cfg, moe = self.config, self.config.moe
    d, n_experts = cfg.d_model, moe.n_experts

    def kernel(name, shape, axes, init=None):
      init = init or kernel_init(cfg, axes)
      value = self.param(name, init, shape, dtype_of(cfg.param_dtype))
      return value.astype(jnp.float32)

    logits = x @ kernel("router", (d, n_experts), ("embed", "expert"))
    if moe.router == "linear":
      return logits, None
    if moe.router != "noisy_mlp":
      raise ValueError(f"unknown router {moe.router!r}")
    clean = jnp.tanh(logits) @ kernel("router_hidden", (n_experts, n_experts), (None, "expert"))
    # Zero-initialised as in LLaMA-MoE (and Shazeer et al.): noise std softplus(0) + 0.01.
    zeros = nn.with_logical_partitioning(nn.initializers.zeros, ("embed", "expert"))
    w_noise = kernel("router_noise", (d, n_experts), ("embed", "expert"), zeros)
    if not self.train:
      return clean, None
    noise_std = jax.nn.softplus(x @ w_noise) + 0.01
    noisy = clean + jax.random.normal(self.make_rng("router"), clean.shape, jnp.float32) * noise_std
    if moe.load_balance != "cv" or moe.top_k >= n_experts:
      return noisy, None
    return noisy, routing.smooth_load(clean, noisy, noise_std, moe.top_k)

  def _dispatch(self, tokens, choice, experts) -> tuple[jax.Array, jax.Array]:
    path = dispatch_path(self.config)
    no_drops = jnp.zeros((), jnp.float32)
    n_experts = self.config.moe.n_experts
    if path in ("dropless", "blocked") and expert_parallel.applies(n_experts, len(tokens)):
      local = dispatch.dropless if path == "dropless" else dispatch.blocked
      return expert_parallel.dispatch(tokens, choice, experts, local), no_drops
    if path == "dropless":
      return dispatch.dropless(tokens, choice, experts), no_drops
    if path == "blocked":
      return dispatch.blocked(tokens, choice, experts), no_drops
    if path == "dense":
      return dispatch.dense(tokens, choice, experts), no_drops
    if path == "loop":
      return dispatch.loop(tokens, choice, experts), no_drops
    moe = self.config.moe
    return dispatch.capacity_dispatch(tokens, choice, experts, moe.capacity_factor,
                                      moe.capacity_group_size)


def _sown_per_layer(intermediates: Any, name: str, is_scanned: Callable[[Any], bool]) -> list:
  """The values sown as `name` by the MoE layers, in layer order, each `[layers, …]`.

  A scanned stack sows one value with a leading layer axis; an unrolled layer sows its
  own, which gets a layer axis of 1.
  """
  found = []

  def visit(tree: dict) -> None:
    for key, value in tree.items():
      if key == name:
        found.append(value[0] if is_scanned(value[0])
                     else jax.tree.map(lambda v: v[None], value[0]))
      elif isinstance(value, dict):
        visit(value)

  visit(intermediates)
  return found


def collect_moe_stats(intermediates: Any) -> dict[str, jax.Array]:
  """Per-layer MoE statistics from an "intermediates" collection, stacked `[layers, …]`.

  Works for scanned models (values already carry a layer axis) and unrolled ones.
  Returns {} for a dense model.
  """
  found = _sown_per_layer(intermediates, "moe_stats",
                          lambda stats: stats["load_balance_loss"].ndim == 1)
  if not found:
    return {}
  return jax.tree.map(lambda *v: jnp.concatenate(v, axis=0), *found)


def collect_router_logits(intermediates: Any) -> jax.Array:
  """Router logits of every MoE layer, float32 `[layers, batch·seq, experts]`.

  From the "intermediates" of `model.apply(..., mutable=["intermediates"])`; raises
  ValueError for a model without MoE layers.
  """
  found = _sown_per_layer(intermediates, "router_logits", lambda logits: logits.ndim == 3)
  if not found:
    raise ValueError("no router logits in these intermediates: the model has no MoE layers")
  return jnp.concatenate(found, axis=0)


def aux_loss(stats: dict[str, jax.Array], config: ModelConfig) -> jax.Array:
  """`lb_coef · mean_layers(LB) + z_coef · mean_layers(z)`; 0 for a dense model.

  Averaging over layers keeps a coefficient's meaning independent of depth.
  """
  if not stats:
    return jnp.zeros((), jnp.float32)
  moe = config.moe
  return (moe.load_balance_coef * jnp.mean(stats["load_balance_loss"])
          + moe.router_z_coef * jnp.mean(stats["router_z_loss"]))

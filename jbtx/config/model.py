"""Model shape: the Llama decoder and its Mixture-of-Experts layers."""

from __future__ import annotations

import dataclasses
from typing import Literal

from jbtx.config.base import require as _require
from jbtx.config.base import require_positive as _require_positive

DType = Literal["float32", "bfloat16", "float16"]
RematPolicy = Literal["none", "full", "dots", "dots_no_batch"]
Routing = Literal["topk", "softmax_topk", "switch", "sample_top1", "soft", "expert_choice"]
Dispatch = Literal["auto", "dropless", "blocked", "capacity", "dense", "loop", "expert_choice"]
# Paths that compute expert-choice routing exactly (the others would run every expert
# on every token through the k = E token-major form, or drop by a second capacity).
EXPERT_CHOICE_DISPATCH = ("auto", "expert_choice", "dense", "loop")
LoadBalance = Literal["btx", "switch", "cv"]
Router = Literal["linear", "noisy_mlp"]
RopeType = Literal["default", "linear", "llama3"]
# Biases of the attention projections: none (Llama), q/k/v (Qwen2), or q/k/v/o (Llama's
# and OLMoE's `attention_bias=True`).
AttentionBias = Literal["none", "qkv", "qkvo"]
# ModelConfig fields that fix the stored tensors and what they compute (not the layout,
# compute numerics or initialisation): what a converted seed and a config must share.
SHAPE_KEYS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff",
              "rope_theta", "rope_scaling", "norm_eps", "qk_norm", "attention_bias",
              "tie_embeddings", "moe")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """Mixture-of-Experts feed-forward layers (see `jbtx.models.moe`).

  Attributes:
    n_experts: experts per MoE layer (E).
    top_k: experts per token (k); "switch" and "sample_top1" use 1, "soft" uses all,
      "expert_choice" uses k · capacity_factor on average.
    d_ff: hidden width of each SwiGLU expert (default: the model's d_ff).
    routing: "topk" (softmax over the top-k logits: BTX, Mixtral), "softmax_topk"
      (softmax over all experts, then top-k: OLMoE), "switch" (top-1 of the softmax,
      capacity-limited), "sample_top1" (Gumbel-softmax sample in training, argmax at
      inference), "soft" (all experts, softmax weights), "expert_choice" (each
      expert takes the C tokens of each group with the highest router probability,
      C = ceil(capacity_factor · group · top_k / E); Zhou et al. 2022; not causal, so
      training and full-sequence evaluation only).
    router: "linear" (logits = x W, param "router" [embed, E]) or "noisy_mlp"
      (LLaMA-MoE's TopKBalancedNoisyGate: logits = tanh(x W) W_h, params "router"
      [embed, E] and "router_hidden" [E, E]; in training Shazeer's noise
      `N(0, 1) · (softplus(x W_noise) + 0.01)` is added, W_noise = "router_noise"
      [embed, E], zero-initialised); "noisy_mlp" needs routing "topk".
    renormalize: for "softmax_topk", divide the k gate values by their sum (OLMoE: no).
    dispatch: "dropless" (sort + grouped matmul), "blocked" (sort + a loop over row
      blocks per expert, for CPU), "capacity" (GShard einsums, tokens over capacity
      dropped), "dense" (every expert on every token), "loop" (the per-expert
      reference), "expert_choice" (each expert on its C tokens; expert-choice
      routing only), or "auto" (the fastest exact path for the backend and routing).
    capacity_factor: expert capacity = factor * tokens * k / E, per group ("switch",
      "capacity" dispatch and "expert_choice" routing).
    capacity_group_size: tokens per routing group (GShard capacity, expert choice).
    every: MoE FFN in every n-th layer (the last of each group of n); 1 = all layers.
    n_shared_experts: always-on experts of width d_ff, added to the routed output.
    output_scale: factor on the routed experts' combined output (not on the shared
      experts'); LLaMA-MoE uses E / k (4.0 for 2-of-8) so that experts split from a
      dense FFN keep its output magnitude.
    router_jitter: multiplicative uniform noise on the router input in training.
    gumbel_temperature: initial temperature τ0 of "sample_top1" in training.
    gumbel_min_temperature: floor of the annealed temperature.
    gumbel_anneal_rate: r of the schedule `τ(step) = max(τ_min, τ0 · exp(−r · step))`
      (Jang et al. 2017's annealing; r = 0 keeps τ0 constant).
    load_balance: "btx" (`N Σ u_i p_i`, u = mean gate value) or "switch"
      (`N Σ f_i p_i`, f = fraction of assignments), both 1 when balanced; or "cv"
      (LLaMA-MoE: `CV²(importance) + CV²(load)`, importance = summed gate values,
      load = tokens per expert, Shazeer's smooth estimate under the noisy gate's
      training noise), 0 when balanced. See `routing.load_balance_loss`.
    load_balance_coef: weight of the load-balancing loss (averaged over layers).
    router_z_coef: weight of the router z-loss (averaged over layers).
  """

  n_experts: int = 8
  top_k: int = 2
  d_ff: int | None = None
  routing: Routing = "topk"
  router: Router = "linear"
  renormalize: bool = True
  dispatch: Dispatch = "auto"
  capacity_factor: float = 1.5
  capacity_group_size: int = 1024
  every: int = 1
  n_shared_experts: int = 0
  output_scale: float = 1.0
  router_jitter: float = 0.0
  gumbel_temperature: float = 1.0
  gumbel_min_temperature: float = 0.5
  gumbel_anneal_rate: float = 1e-4
  load_balance: LoadBalance = "btx"
  load_balance_coef: float = 0.01
  router_z_coef: float = 0.0

  def __post_init__(self):
    _require_positive(self, "n_experts", "top_k", "every", "capacity_group_size")
    _require(self.top_k <= self.n_experts, "top_k",
             f"must be at most n_experts ({self.n_experts}), got {self.top_k}")
    _require(self.d_ff is None or self.d_ff > 0, "d_ff", f"must be positive, got {self.d_ff}")
    _require(self.capacity_factor > 0, "capacity_factor",
             f"must be positive, got {self.capacity_factor}")
    _require(self.n_shared_experts >= 0, "n_shared_experts",
             f"must be non-negative, got {self.n_shared_experts}")
    _require(self.output_scale > 0, "output_scale",
             f"must be positive, got {self.output_scale}")
    _require(self.router != "noisy_mlp" or self.routing == "topk", "routing",
             f"router='noisy_mlp' (LLaMA-MoE's gate) routes with 'topk', got {self.routing!r}")
    _require(0 <= self.router_jitter < 1, "router_jitter",
             f"must be in [0, 1), got {self.router_jitter}")
    _require(self.gumbel_temperature > 0, "gumbel_temperature",
             f"must be positive, got {self.gumbel_temperature}")
    _require(0 < self.gumbel_min_temperature <= self.gumbel_temperature,
             "gumbel_min_temperature",
             f"must be in (0, gumbel_temperature = {self.gumbel_temperature}], "
             f"got {self.gumbel_min_temperature}")
    _require(self.gumbel_anneal_rate >= 0, "gumbel_anneal_rate",
             f"must be non-negative, got {self.gumbel_anneal_rate}")
    if self.routing == "expert_choice":
      _require(self.dispatch in EXPERT_CHOICE_DISPATCH, "dispatch",
               f"expert_choice routing runs with one of {EXPERT_CHOICE_DISPATCH}, "
               f"got {self.dispatch!r}")
    _require(self.dispatch != "expert_choice" or self.routing == "expert_choice", "dispatch",
             f"'expert_choice' dispatch needs routing='expert_choice', got {self.routing!r}")
    for key in ("load_balance_coef", "router_z_coef"):
      _require(getattr(self, key) >= 0, key, f"must be non-negative, got {getattr(self, key)}")

  def router_params(self, d_model: int) -> int:
    """Parameters of one layer's router: `d·E`, plus `E·E + d·E` for "noisy_mlp"."""
    linear = d_model * self.n_experts
    if self.router == "noisy_mlp":
      return 2 * linear + self.n_experts * self.n_experts
    return linear

  @property
  def experts_per_token(self) -> float:
    """k as the routing actually uses it (on average for "expert_choice")."""
    if self.routing in ("switch", "sample_top1"):
      return 1
    if self.routing == "expert_choice":  # C ≤ the group size: at most every expert
      return min(self.n_experts, self.top_k * self.capacity_factor)
    return self.n_experts if self.routing == "soft" else self.top_k


@dataclasses.dataclass(frozen=True)
class RopeScalingConfig:
  """Rotary frequency scaling for contexts longer than pretraining's (HF `rope_scaling`).

  Attributes:
    rope_type: "default" (none), "linear" (positions / factor: every frequency divided
      by `factor`) or "llama3" (Llama-3.1's: wavelengths longer than
      `original_max_position_embeddings / low_freq_factor` divided by `factor`, shorter
      than `… / high_freq_factor` kept, those between interpolated smoothly; as
      transformers' `_compute_llama3_parameters`).
    factor: the scaling factor ("linear", "llama3").
    low_freq_factor, high_freq_factor: the wavelength bounds of "llama3".
    original_max_position_embeddings: pretraining's context length ("llama3").
  """

  rope_type: RopeType = "default"
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  def __post_init__(self):
    _require_positive(self, "factor", "low_freq_factor", "original_max_position_embeddings")
    _require(self.high_freq_factor > self.low_freq_factor, "high_freq_factor",
             f"must exceed low_freq_factor ({self.low_freq_factor}), "
             f"got {self.high_freq_factor}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and numerics of a Llama-style decoder.

  Attributes:
    vocab_size: number of token ids.
    d_model: residual stream width.
    n_layers: number of decoder blocks.
    n_heads: query heads; `head_dim = d_model // n_heads`.
    n_kv_heads: key/value heads (grouped-query attention when < n_heads).
    d_ff: hidden width of the SwiGLU MLP.
    rope_theta: base of the rotary frequencies.
    rope_scaling: scaling of the rotary frequencies (Llama-3's "llama3", "linear").
    norm_eps: epsilon of every RMSNorm.
    max_seq_len: longest sequence the model is meant for (default KV-cache length).
    dtype: compute dtype of activations and matmuls.
    param_dtype: storage dtype of parameters (e.g. float32 master weights).
    scan_layers: run the blocks with `nn.scan` (parameters stacked on a leading
      "layers" axis) instead of unrolling them (parameters under `layers_{i}`).
    remat_policy: activation rematerialisation of each block: "none", "full"
      (save nothing), "dots" (save matmul outputs), "dots_no_batch".
    init_std: standard deviation of the normal initialiser of all kernels.
    qk_norm: RMSNorm over the full query and key width before splitting heads (OLMoE).
    attention_bias: biases on the attention projections: "none", "qkv" (Qwen2) or
      "qkvo" (Llama's and OLMoE's `attention_bias=True`).
    tie_embeddings: the output layer is the input embedding table (logits
      `x @ embedding.T`); there is no "lm_head" parameter.
    moe: Mixture-of-Experts FFN settings; None for a dense model.
  """

  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  d_ff: int
  rope_theta: float = 10000.0
  rope_scaling: RopeScalingConfig = dataclasses.field(default_factory=RopeScalingConfig)
  norm_eps: float = 1e-5
  max_seq_len: int = 4096
  dtype: DType = "float32"
  param_dtype: DType = "float32"
  scan_layers: bool = True
  remat_policy: RematPolicy = "none"
  init_std: float = 0.02
  qk_norm: bool = False
  attention_bias: AttentionBias = "none"
  tie_embeddings: bool = False
  moe: MoEConfig | None = None

  def __post_init__(self):
    _require_positive(self, "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff",
                      "max_seq_len")
    _require(self.d_model % self.n_heads == 0, "n_heads",
             f"must divide d_model ({self.d_model}), got {self.n_heads}")
    _require(self.n_heads % self.n_kv_heads == 0, "n_kv_heads",
             f"must divide n_heads ({self.n_heads}), got {self.n_kv_heads}")
    _require(self.head_dim % 2 == 0, "n_heads",
             f"head_dim = d_model / n_heads must be even for rotary embeddings, "
             f"got {self.head_dim}")
    _require(self.rope_theta > 0, "rope_theta", f"must be positive, got {self.rope_theta}")
    _require(self.norm_eps > 0, "norm_eps", f"must be positive, got {self.norm_eps}")
    _require(self.init_std > 0, "init_std", f"must be positive, got {self.init_std}")
    if self.moe is not None:
      _require(self.n_layers % self.moe.every == 0, "moe.every",
               f"must divide n_layers ({self.n_layers}), got {self.moe.every}")

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads

  def with_shape_of(self, other: ModelConfig) -> ModelConfig:
    """This config with the `SHAPE_KEYS` of `other` (its numerics and layout kept)."""
    return dataclasses.replace(self, **{k: getattr(other, k) for k in SHAPE_KEYS})

  def num_params(self) -> int:
    """Total parameter count (embeddings and output layer included; a tied table once)."""
    return self._count(active=False)

  def num_active_params(self) -> int:
    """Parameters used per token: only k of the E experts count in MoE layers."""
    return self._count(active=True)

  def _count(self, active: bool) -> int:
    attn = self.d_model * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
    if self.qk_norm:
      attn += self.head_dim * (self.n_heads + self.n_kv_heads)
    if self.attention_bias != "none":
      attn += self.head_dim * (self.n_heads + 2 * self.n_kv_heads)
    if self.attention_bias == "qkvo":
      attn += self.d_model
    dense_ffn = 3 * self.d_model * self.d_ff
    layers = self.n_layers * (attn + 2 * self.d_model + dense_ffn)
    if self.moe is not None:
      moe = self.moe
      width = moe.d_ff or self.d_ff
      n_used = moe.experts_per_token if active else moe.n_experts
      moe_ffn = (3 * self.d_model * width * (n_used + moe.n_shared_experts)
                 + moe.router_params(self.d_model))
      layers += (self.n_layers // moe.every) * (moe_ffn - dense_ffn)
    tables = 1 if self.tie_embeddings else 2
    return round(layers) + tables * self.vocab_size * self.d_model + self.d_model

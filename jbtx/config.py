"""Typed, validated configuration.

Experiment files in `configs/` return an `ml_collections.ConfigDict`; `parse` turns it
into frozen dataclasses once, at the edge of the program. Every later piece of jbtx
takes those dataclasses, never raw dicts. Unknown keys, values of the wrong type and
impossible combinations are rejected with a `ConfigError` that names the full key,
e.g. ``config key 'model.n_kv_heads': must divide model.n_heads (32), got 5``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar

DType = Literal["float32", "bfloat16", "float16"]
RematPolicy = Literal["none", "full", "dots", "dots_no_batch"]
Routing = Literal["topk", "softmax_topk", "switch", "sample_top1", "soft"]
Dispatch = Literal["auto", "dropless", "capacity", "dense", "loop"]
LoadBalance = Literal["btx", "switch"]
Freeze = Literal["none", "experts", "all_but_router"]

T = TypeVar("T")

BYTE_VOCAB_SIZE = 259  # jbtx.data.tokenizers.ByteTokenizer.vocab_size


class ConfigError(ValueError):
  """A configuration value is unknown, mistyped or impossible; the message names the key."""

  def __init__(self, key: str, message: str):
    self.key = key
    self.message = message
    super().__init__(f"config key '{key}': {message}")

  def under(self, prefix: str) -> ConfigError:
    """The same error with `prefix` prepended to the key path."""
    return ConfigError(f"{prefix}.{self.key}" if prefix else self.key, self.message)


def _require(condition: bool, key: str, message: str) -> None:
  if not condition:
    raise ConfigError(key, message)


def _require_positive(config: Any, *keys: str) -> None:
  for key in keys:
    value = getattr(config, key)
    _require(value > 0, key, f"must be positive, got {value}")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """Mixture-of-Experts feed-forward layers (see `jbtx.models.moe`).

  Attributes:
    n_experts: experts per MoE layer (E).
    top_k: experts per token (k); "switch" and "sample_top1" use 1, "soft" uses all.
    d_ff: hidden width of each SwiGLU expert (default: the model's d_ff).
    routing: "topk" (softmax over the top-k logits: BTX, Mixtral), "softmax_topk"
      (softmax over all experts, then top-k: OLMoE), "switch" (top-1 of the softmax,
      capacity-limited), "sample_top1" (Gumbel-softmax sample in training, argmax at
      inference), "soft" (all experts, softmax weights).
    renormalize: for "softmax_topk", divide the k gate values by their sum (OLMoE: no).
    dispatch: "dropless" (sort + grouped matmul), "capacity" (GShard einsums, tokens
      over capacity dropped), "dense" (every expert on every token), "loop" (the
      per-expert reference), or "auto" (the fastest exact path for the backend).
    capacity_factor: expert capacity = factor * tokens * k / E, per group.
    capacity_group_size: tokens per GShard routing group.
    every: MoE FFN in every n-th layer (the last of each group of n); 1 = all layers.
    n_shared_experts: always-on experts of width d_ff, added to the routed output.
    router_jitter: multiplicative uniform noise on the router input in training.
    gumbel_temperature: temperature of "sample_top1" in training.
    load_balance: "btx" (`N Σ u_i p_i`, u = mean gate value) or "switch"
      (`N Σ f_i p_i`, f = fraction of assignments); both equal 1 when balanced.
    load_balance_coef: weight of the load-balancing loss (averaged over layers).
    router_z_coef: weight of the router z-loss (averaged over layers).
  """

  n_experts: int = 8
  top_k: int = 2
  d_ff: int | None = None
  routing: Routing = "topk"
  renormalize: bool = True
  dispatch: Dispatch = "auto"
  capacity_factor: float = 1.5
  capacity_group_size: int = 1024
  every: int = 1
  n_shared_experts: int = 0
  router_jitter: float = 0.0
  gumbel_temperature: float = 1.0
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
    _require(0 <= self.router_jitter < 1, "router_jitter",
             f"must be in [0, 1), got {self.router_jitter}")
    _require(self.gumbel_temperature > 0, "gumbel_temperature",
             f"must be positive, got {self.gumbel_temperature}")
    for key in ("load_balance_coef", "router_z_coef"):
      _require(getattr(self, key) >= 0, key, f"must be non-negative, got {getattr(self, key)}")

  @property
  def experts_per_token(self) -> int:
    """k as the routing actually uses it."""
    if self.routing in ("switch", "sample_top1"):
      return 1
    return self.n_experts if self.routing == "soft" else self.top_k


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
    moe: Mixture-of-Experts FFN settings; None for a dense model.
  """

  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  d_ff: int
  rope_theta: float = 10000.0
  norm_eps: float = 1e-5
  max_seq_len: int = 4096
  dtype: DType = "float32"
  param_dtype: DType = "float32"
  scan_layers: bool = True
  remat_policy: RematPolicy = "none"
  init_std: float = 0.02
  qk_norm: bool = False
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

  def num_params(self) -> int:
    """Total parameter count (embeddings and output layer included)."""
    return self._count(active=False)

  def num_active_params(self) -> int:
    """Parameters used per token: only k of the E experts count in MoE layers."""
    return self._count(active=True)

  def _count(self, active: bool) -> int:
    attn = self.d_model * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
    if self.qk_norm:
      attn += self.head_dim * (self.n_heads + self.n_kv_heads)
    dense_ffn = 3 * self.d_model * self.d_ff
    layers = self.n_layers * (attn + 2 * self.d_model + dense_ffn)
    if self.moe is not None:
      moe = self.moe
      width = moe.d_ff or self.d_ff
      n_used = moe.experts_per_token if active else moe.n_experts
      moe_ffn = (3 * self.d_model * width * (n_used + moe.n_shared_experts)
                 + self.d_model * moe.n_experts)
      layers += (self.n_layers // moe.every) * (moe_ffn - dense_ffn)
    return layers + 2 * self.vocab_size * self.d_model + self.d_model


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Training data.

  Attributes:
    corpus: "stdlib_code" (built in: the interpreter's standard library sources).
    seq_len: tokens per packed row.
    batch_size: rows per step (global batch).
    validation_fraction: share of documents held out for validation.
  """

  corpus: Literal["stdlib_code"] = "stdlib_code"
  seq_len: int = 256
  batch_size: int = 16
  validation_fraction: float = 0.05

  def __post_init__(self):
    _require(self.seq_len > 1, "seq_len", f"must be at least 2, got {self.seq_len}")
    _require(self.batch_size > 0, "batch_size", f"must be positive, got {self.batch_size}")
    _require(0 < self.validation_fraction < 1, "validation_fraction",
             f"must be in (0, 1), got {self.validation_fraction}")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """AdamW with linear warmup and cosine decay to `min_lr_ratio * learning_rate`.

  `freeze`: "none"; "experts" (train everything but the MoE expert FFNs); or
  "all_but_router" (train only the MoE routers). Frozen parameters get no update.
  """

  learning_rate: float = 3e-3
  warmup_steps: int = 20
  min_lr_ratio: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  grad_clip_norm: float = 1.0
  freeze: Freeze = "none"

  def __post_init__(self):
    _require(self.learning_rate > 0, "learning_rate",
             f"must be positive, got {self.learning_rate}")
    _require(self.warmup_steps >= 0, "warmup_steps",
             f"must be non-negative, got {self.warmup_steps}")
    _require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio",
             f"must be in [0, 1], got {self.min_lr_ratio}")
    for key in ("b1", "b2"):
      _require(0 <= getattr(self, key) < 1, key, f"must be in [0, 1), got {getattr(self, key)}")
    _require(self.weight_decay >= 0, "weight_decay",
             f"must be non-negative, got {self.weight_decay}")
    _require(self.grad_clip_norm > 0, "grad_clip_norm",
             f"must be positive, got {self.grad_clip_norm}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """The training run of one stage.

  Attributes:
    steps: optimizer steps.
    log_every: steps between log lines (each line averages the steps since the last).
    eval_batches: validation batches for the loss/perplexity report.
    sample_prompt: text continued after training, as a qualitative check.
    sample_tokens: tokens to generate (0 = no sample).
    sample_temperature: sampling temperature of that continuation (0 = greedy).
  """

  steps: int = 200
  log_every: int = 20
  eval_batches: int = 8
  sample_prompt: str = "def "
  sample_tokens: int = 80
  sample_temperature: float = 0.8

  def __post_init__(self):
    _require_positive(self, "steps", "log_every", "eval_batches")
    _require(self.sample_tokens >= 0, "sample_tokens",
             f"must be non-negative, got {self.sample_tokens}")
    _require(self.sample_temperature >= 0, "sample_temperature",
             f"must be non-negative (0 = greedy), got {self.sample_temperature}")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """Everything one `python -m jbtx.train` run needs."""

  model: ModelConfig
  seed: int = 0
  data: DataConfig = DataConfig()
  optimizer: OptimizerConfig = OptimizerConfig()
  train: TrainConfig = TrainConfig()

  def __post_init__(self):
    _require(self.data.seq_len <= self.model.max_seq_len, "data.seq_len",
             f"exceeds model.max_seq_len ({self.model.max_seq_len}), got {self.data.seq_len}")
    _require(self.model.vocab_size >= BYTE_VOCAB_SIZE, "model.vocab_size",
             f"the {self.data.corpus} corpus uses byte tokens, which need at least "
             f"{BYTE_VOCAB_SIZE} ids, got {self.model.vocab_size}")
    _require(self.optimizer.warmup_steps <= self.train.steps, "optimizer.warmup_steps",
             f"exceeds train.steps ({self.train.steps}), got {self.optimizer.warmup_steps}")


# --------------------------------------------------------------------------------------
# Generic ConfigDict -> dataclass conversion.
# --------------------------------------------------------------------------------------


def from_mapping(cls: type[T], data: Mapping[str, Any] | Any, key: str = "") -> T:
  """Builds the frozen dataclass `cls` from a (Config)dict, checking every key and type.

  Args:
    cls: a dataclass type whose fields carry type annotations.
    data: a mapping (dict or `ml_collections.ConfigDict`) with the field values.
    key: the dotted path of `data` in the full config, used in error messages.

  Raises:
    ConfigError: for unknown or missing keys, wrong types or invalid values.
  """
  if hasattr(data, "to_dict"):
    data = data.to_dict()
  if not isinstance(data, Mapping):
    raise ConfigError(key or "<root>", f"expected a group of settings, got {data!r}")
  hints = typing.get_type_hints(cls)
  fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
  unknown = sorted(set(data) - set(fields))
  if unknown:
    raise ConfigError(_join(key, unknown[0]),
                      f"unknown key; valid keys are {', '.join(sorted(fields))}")
  values = {}
  for name, field in fields.items():
    path = _join(key, name)
    if name in data:
      values[name] = _coerce(hints[name], data[name], path)
    elif (field.default is dataclasses.MISSING
          and field.default_factory is dataclasses.MISSING):
      raise ConfigError(path, "missing required key")
  try:
    return cls(**values)
  except ConfigError as e:
    raise e.under(key) from None


def _join(prefix: str, name: str) -> str:
  return f"{prefix}.{name}" if prefix else name


def _coerce(hint: Any, value: Any, key: str) -> Any:
  """Checks `value` against the type `hint`; returns it converted where lossless."""
  origin = typing.get_origin(hint)
  args = typing.get_args(hint)
  if dataclasses.is_dataclass(hint):
    return from_mapping(hint, value, key)
  if origin in (typing.Union, types.UnionType):
    if value is None and type(None) in args:
      return None
    errors = []
    for option in (a for a in args if a is not type(None)):
      try:
        return _coerce(option, value, key)
      except ConfigError as e:
        errors.append(e.message)
    raise ConfigError(key, " or ".join(errors))
  if origin is Literal:
    if value not in args:
      raise ConfigError(key, f"must be one of {', '.join(map(repr, args))}, got {value!r}")
    return value
  if hint is float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ConfigError(key, f"expected a number, got {value!r}")
    return float(value)
  if hint is int:
    if isinstance(value, bool) or not isinstance(value, int):
      raise ConfigError(key, f"expected an integer, got {value!r}")
    return value
  if hint in (str, bool):
    if not isinstance(value, hint):
      raise ConfigError(key, f"expected {hint.__name__}, got {value!r}")
    return value
  raise TypeError(f"unsupported config annotation {hint!r} for {key}")


def to_dict(config: Any) -> dict[str, Any]:
  """The plain-dict form of a config dataclass (inverse of `from_mapping`)."""
  return dataclasses.asdict(config)

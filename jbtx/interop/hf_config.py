"""HF `config.json` <-> ModelConfig for the dense decoders (Llama, Qwen2), and the keys
every HF Llama-style model shares (`interop.hf_moe_map` adds Mixtral's and OLMoE's).

Supported beyond Llama-2: tied input/output embeddings (`tie_word_embeddings`),
attention biases (Llama's `attention_bias` on q/k/v/o; Qwen2's on q/k/v), and the
"linear" and "llama3" rotary scalings. Rotary settings: transformers 4 writes
`rope_theta` and `rope_scaling` (None, or a dict with `rope_type` or `type` and the
scaling's parameters); transformers 5 writes `rope_parameters` (the same dict with
`rope_theta` in it) and, loading, lets a non-empty `rope_scaling` win. Import reads
either that way; export writes both. Everything else that changes the model is refused
naming the key and value ("yarn" or "dynamic" rotary scaling, MLP biases, Qwen2's
sliding-window attention), before anything is written.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jbtx.config import ConfigError, ModelConfig, RopeScalingConfig
from jbtx.config.model import AttentionBias
from jbtx.interop.hf_tensor_map import ConversionError

LLAMA, QWEN2 = "llama", "qwen2"
DENSE_TYPES = (LLAMA, QWEN2)
# The parameters each supported rotary type reads, besides its type and `rope_theta`.
_ROPE_PARAMETERS = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor",
               "original_max_position_embeddings"),
}


# --------------------------------------------------------------------------------------
# Rotary frequencies.
# --------------------------------------------------------------------------------------


def _rope_dict(hf: Mapping[str, Any], source: str) -> tuple[str, dict[str, Any]]:
  """The key that sets the rotary frequencies, as transformers 5 picks it, and its dict
  (empty when neither key is set)."""
  key = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
  rope = hf.get(key) or {}
  if not isinstance(rope, Mapping):
    raise ConversionError(f"{source}: {key}={rope!r} is not a dict of rotary settings")
  return key, dict(rope)


def rope_from_hf(hf: Mapping[str, Any], source: str) -> tuple[float, RopeScalingConfig]:
  """`(rope_theta, rope_scaling)` of an HF `config.json` dict; `source` names the file.

  Raises:
    ConversionError: naming the key and value of an unsupported scaling type, or of a
      parameter jbtx does not read.
  """
  key, rope = _rope_dict(hf, source)
  type_key = "rope_type" if "rope_type" in rope else "type"
  kind = rope.pop(type_key, "default")
  rope.pop("type", None)  # transformers 4 may write both names
  if kind not in _ROPE_PARAMETERS:
    raise ConversionError(f"{source}: {key}.{type_key}={kind!r} is not supported by jbtx "
                          f"(supported: {', '.join(map(repr, _ROPE_PARAMETERS))})")
  theta = rope.pop("rope_theta", None)
  if theta is None:
    theta = (hf.get("rope_parameters") or {}).get("rope_theta", hf.get("rope_theta", 10000.0))
  if rope.get("partial_rotary_factor") == 1.0:
    del rope["partial_rotary_factor"]
  unknown = sorted(set(rope) - set(_ROPE_PARAMETERS[kind]))
  if unknown:
    raise ConversionError(f"{source}: {key}.{unknown[0]}={rope[unknown[0]]!r} is not "
                          f"supported by jbtx (rope_type {kind!r})")
  if kind == "llama3":
    rope.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings"))
  missing = [name for name in _ROPE_PARAMETERS[kind] if rope.get(name) is None]
  if missing:
    raise ConversionError(f"{source}: {key} of rope_type {kind!r} lacks {missing[0]!r}")
  try:
    return float(theta), RopeScalingConfig(rope_type=kind, **rope)
  except ConfigError as e:
    raise ConversionError(f"{source}: {key}: {e}") from None


def rope_to_hf(cfg: ModelConfig) -> dict[str, Any]:
  """The `config.json` keys of `cfg`'s rotary frequencies, for transformers 4 and 5."""
  scaling = cfg.rope_scaling
  parameters = {name: getattr(scaling, name) for name in _ROPE_PARAMETERS[scaling.rope_type]}
  legacy = {"rope_type": scaling.rope_type, **parameters}
  return {"rope_theta": cfg.rope_theta,
          "rope_parameters": {**legacy, "rope_theta": cfg.rope_theta},
          "rope_scaling": legacy if parameters else None}


# --------------------------------------------------------------------------------------
# Import.
# --------------------------------------------------------------------------------------


def decoder_config_from_hf(hf: Mapping[str, Any], source: str, **fields: Any) -> ModelConfig:
  """ModelConfig from the keys all HF Llama-style `config.json` dicts share.

  Args:
    hf: the parsed `config.json` (Llama, Qwen2, Mixtral or OLMoE).
    source: names the file in errors.
    **fields: further ModelConfig fields (`attention_bias`, `qk_norm`, `moe`).
  """
  if hf.get("mlp_bias"):
    raise ConversionError(f"{source}: mlp_bias={hf['mlp_bias']!r} is not supported by jbtx")
  if hf.get("hidden_act", "silu") != "silu":
    raise ConversionError(f"{source}: hidden_act {hf['hidden_act']!r} is not 'silu'")
  theta, scaling = rope_from_hf(hf, source)
  try:
    n_heads = hf["num_attention_heads"]
    cfg = ModelConfig(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        d_ff=hf["intermediate_size"], rope_theta=theta, rope_scaling=scaling,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_seq_len=hf.get("max_position_embeddings", 4096),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), **fields)
  except KeyError as e:
    raise ConversionError(f"{source}: missing key {e.args[0]!r}") from None
  except ConfigError as e:
    raise ConversionError(f"{source}: {e}") from None
  if hf.get("head_dim") not in (None, cfg.head_dim):
    raise ConversionError(f"{source}: head_dim {hf['head_dim']} != hidden_size / "
                          f"num_attention_heads = {cfg.head_dim}, which jbtx requires")
  return cfg


def attention_bias_from_hf(hf: Mapping[str, Any]) -> AttentionBias:
  """Llama's and OLMoE's `attention_bias`: biases on q, k, v and o, or none."""
  return "qkvo" if hf.get("attention_bias") else "none"


def model_config_from_hf(hf: Mapping[str, Any], source: str) -> ModelConfig:
  """ModelConfig from an HF Llama or Qwen2 `config.json` dict; `source` names the file.

  Qwen2's sliding-window attention is refused when it is on (`use_sliding_window`).
  """
  kind = hf.get("model_type")
  if kind == LLAMA:
    return decoder_config_from_hf(hf, source, attention_bias=attention_bias_from_hf(hf))
  if kind != QWEN2:
    raise ConversionError(f"{source}: model_type {kind!r} is not one of {DENSE_TYPES}")
  if hf.get("use_sliding_window"):
    raise ConversionError(f"{source}: use_sliding_window={hf['use_sliding_window']!r} "
                          f"(sliding_window={hf.get('sliding_window')!r}) is not supported by "
                          "jbtx, whose attention sees every earlier token")
  return decoder_config_from_hf(hf, source, attention_bias="qkv")


# --------------------------------------------------------------------------------------
# Export.
# --------------------------------------------------------------------------------------


def decoder_hf_config(cfg: ModelConfig, dtype: str) -> dict[str, Any]:
  """The `config.json` keys all HF Llama-style models share, for the shape of `cfg`."""
  return {
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.d_model,
      "intermediate_size": cfg.d_ff,
      "num_hidden_layers": cfg.n_layers,
      "num_attention_heads": cfg.n_heads,
      "num_key_value_heads": cfg.n_kv_heads,
      "hidden_act": "silu",
      "max_position_embeddings": cfg.max_seq_len,
      "rms_norm_eps": cfg.norm_eps,
      **rope_to_hf(cfg),
      "tie_word_embeddings": cfg.tie_embeddings,
      "torch_dtype": dtype,
      "dtype": dtype,
  }


def hf_config_from_model(cfg: ModelConfig, dtype: str) -> dict[str, Any]:
  """An HF `config.json` dict for the dense `cfg`: Qwen2 if it has q/k/v biases only,
  else Llama (with `attention_bias` for q/k/v/o biases)."""
  if cfg.moe is not None or cfg.qk_norm:
    raise ConversionError("HF Llama and Qwen2 have no MoE layers and no QK norm")
  if cfg.attention_bias == "qkv":
    return {"architectures": ["Qwen2ForCausalLM"], "model_type": QWEN2,
            **decoder_hf_config(cfg, dtype), "use_sliding_window": False,
            "sliding_window": None, "max_window_layers": cfg.n_layers}
  return {
      "architectures": ["LlamaForCausalLM"],
      "model_type": LLAMA,
      **decoder_hf_config(cfg, dtype),
      "head_dim": cfg.head_dim,
      "attention_bias": cfg.attention_bias == "qkvo",
      "mlp_bias": False,
  }

"""Hugging Face Mixtral and OLMoE: their configs and expert tensors in jbtx's MoE layout.

Both are Llama-style decoders (`hf_tensor_map.tensor_maps` covers embeddings, attention and
norms; OLMoE adds QK norms) whose every feed-forward layer is a routed MoE of SwiGLU
experts. jbtx holds one MoE layer as

    moe/router [embed, E]    moe/gate, moe/up [E, embed, d_ff]    moe/down [E, d_ff, embed]

HF checkpoints come in two layouts (prefix "model.layers.{i}."):

  per-expert: what `save_pretrained` writes (transformers 5 converts back to it on
  save) and what older checkpoints hold; HF linear weights are `[out, in]`.
    Mixtral  block_sparse_moe.gate.weight [E, embed]
             block_sparse_moe.experts.{j}.w1 / w3 / w2 .weight   (gate / up / down)
    OLMoE    mlp.gate.weight [E, embed]
             mlp.experts.{j}.gate_proj / up_proj / down_proj .weight
  fused: transformers 5's in-memory `state_dict`, for both models.
    mlp.gate.weight [E, embed]
    mlp.experts.gate_up_proj [E, 2 d_ff, embed]   (gate rows first, then up)
    mlp.experts.down_proj [E, embed, d_ff]

Import reads either, detected from the tensor names; export writes the per-expert
layout, which every transformers version loads.

Routing. Mixtral takes a softmax over all experts, keeps the top k and renormalises
them: the same gates as a softmax over the top-k logits (jbtx "topk"). OLMoE keeps
the top k of the softmax as they are ("softmax_topk", `renormalize=norm_topk_prob`).
Both train with HF's Switch-style load-balancing loss ("switch"). A jbtx MoE model
exports as OLMoE if it has QK norms, else as Mixtral.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Mapping
from typing import Any

from jbtx.config import ConfigError, ModelConfig, MoEConfig
from jbtx.interop import hf_config, hf_tensor_map
from jbtx.interop.hf_tensor_map import ConversionError, TensorMap

MIXTRAL, OLMOE = "mixtral", "olmoe"
MODEL_TYPES = (MIXTRAL, OLMOE)

_ARCHITECTURES = {MIXTRAL: "MixtralForCausalLM", OLMOE: "OlmoeForCausalLM"}
# config.json key of the expert count, and HF's default load-balancing coefficient.
_N_EXPERTS_KEY = {MIXTRAL: "num_local_experts", OLMOE: "num_experts"}
_AUX_COEF_DEFAULT = {MIXTRAL: 0.001, OLMOE: 0.01}
# Per-expert tensor names of the jbtx expert kernels gate, up, down.
_EXPERT_NAMES = {MIXTRAL: {"gate": "w1", "up": "w3", "down": "w2"},
                 OLMOE: {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}}
_ROUTING = {MIXTRAL: "a renormalised top-k softmax, jbtx 'topk'; MoE models with qk_norm "
                     "export as OLMoE",
            OLMOE: "a top-k softmax, jbtx 'softmax_topk' or 'topk'"}
# Not in transformers' configs: jbtx writes it so that a round trip keeps the z-loss.
_Z_COEF_KEY = "router_z_loss_coef"


def model_type(cfg: ModelConfig) -> str:
  """The HF model an MoE `cfg` corresponds to: OLMoE with QK norms, else Mixtral."""
  return OLMOE if cfg.qk_norm else MIXTRAL


# --------------------------------------------------------------------------------------
# Configs.
# --------------------------------------------------------------------------------------


def model_config_from_hf(hf: Mapping[str, Any], source: str) -> ModelConfig:
  """ModelConfig from an HF Mixtral or OLMoE `config.json` dict; `source` names the file."""
  kind = hf.get("model_type")
  if kind not in MODEL_TYPES:
    raise ConversionError(f"{source}: model_type {kind!r} is not 'mixtral' or 'olmoe'")
  unsupported = ("sliding_window", "attention_bias") if kind == MIXTRAL else ("clip_qkv",)
  for key in unsupported:
    if hf.get(key) not in (None, False):
      raise ConversionError(f"{source}: {key}={hf[key]!r} is not supported by jbtx")
  if kind == MIXTRAL:
    routing: dict[str, Any] = {"routing": "topk"}
  else:
    routing = {"routing": "softmax_topk", "renormalize": bool(hf.get("norm_topk_prob", False))}
  try:
    moe = MoEConfig(
        n_experts=hf[_N_EXPERTS_KEY[kind]], top_k=hf["num_experts_per_tok"],
        d_ff=hf["intermediate_size"], load_balance="switch",
        load_balance_coef=float(hf.get("router_aux_loss_coef", _AUX_COEF_DEFAULT[kind])),
        router_z_coef=float(hf.get(_Z_COEF_KEY, 0.0)), **routing)
  except KeyError as e:
    raise ConversionError(f"{source}: missing key {e.args[0]!r}") from None
  except ConfigError as e:
    raise ConversionError(f"{source}: {e.under('moe')}") from None
  return hf_config.decoder_config_from_hf(hf, source, qk_norm=kind == OLMOE, moe=moe,
                                          attention_bias=hf_config.attention_bias_from_hf(hf))


def hf_config_from_model(cfg: ModelConfig, dtype: str) -> dict[str, Any]:
  """An HF `config.json` dict for the Mixtral or OLMoE with the shape of the MoE `cfg`.

  Of the training-only settings, the load-balancing and z-loss coefficients are kept;
  the load-balancing kind, router jitter and dispatch do not change the model's outputs
  and are dropped.

  Raises:
    ConversionError: if `cfg` has features the HF model lacks (MoE in only some layers,
      shared experts, routing other than the model's own, attention biases other than
      OLMoE's on q/k/v/o).
  """
  moe, kind = cfg.moe, model_type(cfg)
  # Whether the k gate values are renormalised; None if routing is not a top-k softmax.
  renormalized = {"topk": True, "softmax_topk": moe.renormalize}.get(moe.routing)
  problems = []
  if moe.every != 1:
    problems.append(f"moe.every={moe.every} (HF has an MoE FFN in every layer)")
  if moe.n_shared_experts:
    problems.append(f"moe.n_shared_experts={moe.n_shared_experts}")
  if renormalized is None or (kind == MIXTRAL and not renormalized):
    detail = " without renormalize" if renormalized is False else ""
    problems.append(f"moe.routing={moe.routing!r}{detail} (HF {kind} routes by "
                    f"{_ROUTING[kind]})")
  if cfg.attention_bias != "none" and (kind == MIXTRAL or cfg.attention_bias != "qkvo"):
    problems.append(f"attention_bias={cfg.attention_bias!r} (HF {kind} has "
                    f"{'none' if kind == MIXTRAL else 'biases on q, k, v and o or none'})")
  if problems:
    raise ConversionError(f"cannot export as HF {_ARCHITECTURES[kind]}: {'; '.join(problems)}")
  config = {
      "architectures": [_ARCHITECTURES[kind]],
      "model_type": kind,
      **hf_config.decoder_hf_config(cfg, dtype),
      "intermediate_size": moe.d_ff or cfg.d_ff,
      _N_EXPERTS_KEY[kind]: moe.n_experts,
      "num_experts_per_tok": moe.top_k,
      "router_aux_loss_coef": moe.load_balance_coef,
      _Z_COEF_KEY: moe.router_z_coef,
  }
  if kind == MIXTRAL:
    return config | {"head_dim": cfg.head_dim, "sliding_window": None}
  return config | {"norm_topk_prob": renormalized, "clip_qkv": None,
                   "attention_bias": cfg.attention_bias == "qkvo"}


# --------------------------------------------------------------------------------------
# Tensors.
# --------------------------------------------------------------------------------------


def is_fused(names: Collection[str]) -> bool:
  """Whether a checkpoint with these tensor names stores experts fused (transformers 5)."""
  return any(name.endswith(".experts.gate_up_proj") for name in names)


def tensor_maps(cfg: ModelConfig, fused: bool = False) -> list[TensorMap]:
  """All tensors of the HF Mixtral or OLMoE (`model_type(cfg)`) with the shape `cfg`.

  Args:
    cfg: an all-MoE model shape.
    fused: experts in transformers 5's fused layout (read only) instead of per expert.
  """
  return hf_tensor_map.tensor_maps(cfg, functools.partial(_moe_maps, model_type(cfg), fused))


def _moe_maps(kind: str, fused: bool, cfg: ModelConfig, layer: int,
              prefix: str) -> list[TensorMap]:
  """The router and expert tensors of one layer (`prefix` = "model.layers.{i}.")."""
  n, d, ff = cfg.moe.n_experts, cfg.d_model, cfg.moe.d_ff or cfg.d_ff
  block = f"{prefix}block_sparse_moe." if kind == MIXTRAL and not fused else f"{prefix}mlp."
  maps = [hf_tensor_map.linear(f"{block}gate.weight", ("moe", "router"), layer, (n, d), (d, n))]
  if fused:
    gate_up = f"{block}experts.gate_up_proj"
    return [
        *maps,
        TensorMap(gate_up, ("moe", "gate"), layer, (n, 2 * ff, d), (n, d, ff),
                  lambda w: w[:, :ff].transpose(0, 2, 1), None),
        TensorMap(gate_up, ("moe", "up"), layer, (n, 2 * ff, d), (n, d, ff),
                  lambda w: w[:, ff:].transpose(0, 2, 1), None),
        TensorMap(f"{block}experts.down_proj", ("moe", "down"), layer, (n, d, ff), (n, ff, d),
                  lambda w: w.transpose(0, 2, 1), None),
    ]
  names = _EXPERT_NAMES[kind]
  for e in range(n):
    for part, hf_shape in (("gate", (ff, d)), ("up", (ff, d)), ("down", (d, ff))):
      maps.append(hf_tensor_map.linear(f"{block}experts.{e}.{names[part]}.weight", ("moe", part),
                                  layer, hf_shape, hf_shape[::-1], expert=e))
  return maps

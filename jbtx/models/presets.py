"""Named model shapes.

The Llama-2 shapes are the published ones (Touvron et al. 2023, and the `params.json`
of Meta's release): d_ff follows Meta's rule
`multiple_of * ceil(ffn_dim_multiplier * int(8 * d_model / 3) / multiple_of)`.
Mixtral 8x7B follows its `config.json`; OLMoE-1B-7B follows the OLMoE paper (vocab 50280
padded to 50304, QK-norm, 64 experts of width 1024, top-8 of a softmax over all 64
without renormalisation, LB 0.01 and z-loss 0.001); SmolLM2-135M its `config.json`.
`demo` is the CPU demo's model; the tiny and micro presets are for tests.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import ml_collections

from jbtx.config import ModelConfig, MoEConfig, to_config_dict

_LLAMA2 = dict(vocab_size=32000, rope_theta=10000.0, norm_eps=1e-5, max_seq_len=4096)

_PRESETS: dict[str, Callable[[], ModelConfig]] = {
    "llama2_7b": lambda: ModelConfig(**_LLAMA2, d_model=4096, n_layers=32, n_heads=32,
                                     n_kv_heads=32, d_ff=11008),
    "llama2_13b": lambda: ModelConfig(**_LLAMA2, d_model=5120, n_layers=40, n_heads=40,
                                      n_kv_heads=40, d_ff=13824),
    "llama2_70b": lambda: ModelConfig(**_LLAMA2, d_model=8192, n_layers=80, n_heads=64,
                                      n_kv_heads=8, d_ff=28672),
    "mixtral_8x7b": lambda: ModelConfig(
        vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336,
        rope_theta=1e6, norm_eps=1e-5, max_seq_len=32768,
        moe=MoEConfig(n_experts=8, top_k=2, routing="topk", load_balance="switch",
                      load_balance_coef=0.001)),
    "olmoe_1b_7b": lambda: ModelConfig(
        vocab_size=50304, d_model=2048, n_layers=16, n_heads=16, n_kv_heads=16, d_ff=1024,
        rope_theta=10000.0, norm_eps=1e-5, max_seq_len=4096, qk_norm=True,
        moe=MoEConfig(n_experts=64, top_k=8, routing="softmax_topk", renormalize=False,
                      load_balance="switch", load_balance_coef=0.01, router_z_coef=0.001)),
    # HuggingFaceTB/SmolLM2-135M's config.json: a small real seed (tied embeddings).
    "smollm2_135m": lambda: ModelConfig(
        vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, d_ff=1536,
        rope_theta=100000.0, norm_eps=1e-5, max_seq_len=8192, tie_embeddings=True),
    # 0.35M parameters, byte vocabulary: the CPU demo (its seed, configs/seed.py).
    "demo": lambda: ModelConfig(vocab_size=259, d_model=96, n_layers=3, n_heads=4,
                                n_kv_heads=2, d_ff=256, max_seq_len=512),
    # 0.80M parameters, byte vocabulary: most tests.
    "tiny": lambda: ModelConfig(vocab_size=259, d_model=128, n_layers=4, n_heads=4,
                                n_kv_heads=2, d_ff=352, max_seq_len=512),
    # 4 experts of the tiny model's FFN width, top-2: BTX-shaped tests.
    "tiny_moe": lambda: ModelConfig(vocab_size=259, d_model=128, n_layers=4, n_heads=4,
                                    n_kv_heads=2, d_ff=352, max_seq_len=512,
                                    moe=MoEConfig(n_experts=4, top_k=2)),
    # For fast unit tests.
    "micro": lambda: ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4,
                                 n_kv_heads=2, d_ff=72, max_seq_len=128),
    "micro_moe": lambda: ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4,
                                     n_kv_heads=2, d_ff=24, max_seq_len=128,
                                     moe=MoEConfig(n_experts=4, top_k=2)),
}


def names() -> list[str]:
  return sorted(_PRESETS)


def get(name: str, **overrides) -> ModelConfig:
  """The preset `name`, with fields replaced by `overrides`."""
  if name not in _PRESETS:
    raise KeyError(f"unknown model preset {name!r}; known presets: {', '.join(names())}")
  return dataclasses.replace(_PRESETS[name](), **overrides)


def config_dict(name: str, **overrides) -> ml_collections.ConfigDict:
  """The preset as a ConfigDict, for experiment files (`config.model = config_dict(...)`)."""
  return to_config_dict(get(name, **overrides))

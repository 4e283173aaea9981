"""The Hugging Face Llama layout and its map onto jbtx parameters.

Both Llama importers speak this layout: HF checkpoints are in it already, and Meta's
checkpoints are presented in it by `interop.meta_llama`. Export writes it back. HF's
Mixtral and OLMoE share it except for their feed-forward layers (`interop.hf_moe_map`).

HF stores linear weights as `[out, in]`; jbtx kernels are `[in, out]` with attention
heads split out (`q: [embed, q_heads, head_dim]`, `o: [q_heads, head_dim, embed]`).
HF's q/k rows already follow jbtx's rotate-half rotary convention, so no permutation
is needed here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
from flax import traverse_util

from jbtx.config import ConfigError, ModelConfig

Params = dict[str, Any]

# Tensors some checkpoints carry that hold no learned state.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class ConversionError(ValueError):
  """A checkpoint cannot be converted; the message names the tensor or file at fault."""


@dataclasses.dataclass(frozen=True)
class TensorMap:
  """Where one HF tensor (or one part of it) lives in the jbtx tree, and how to transform it.

  Several maps may fill one jbtx leaf: one per layer when layers are stacked, and one
  per expert when `expert` is set (HF's per-expert MoE tensors). Several maps may also
  read one HF tensor, each taking its own part (HF's fused `gate_up_proj`).

  Attributes:
    hf_name: e.g. "model.layers.3.self_attn.q_proj.weight".
    path: key path in the jbtx tree of one layer (or of the whole model when `layer`
      is None), e.g. ("attn", "q", "kernel").
    layer: decoder layer index, or None for embeddings, final norm and output layer.
    hf_shape: the HF tensor's shape.
    jbtx_shape: the shape of what it fills in the jbtx leaf of one layer: the whole
      leaf, or the slot `leaf[expert]`.
    to_jbtx: HF array -> jbtx array.
    to_hf: jbtx array -> HF array; None for tensors jbtx reads but never writes (parts
      of a fused HF tensor).
    expert: the slot along the leading expert axis of the leaf this tensor fills, or
      None if it fills the whole leaf.
  """

  hf_name: str
  path: tuple[str, ...]
  layer: int | None
  hf_shape: tuple[int, ...]
  jbtx_shape: tuple[int, ...]
  to_jbtx: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray] | None
  expert: int | None = None


def linear(hf_name: str, path: tuple[str, ...], layer: int | None, hf_shape: tuple[int, int],
           jbtx_shape: tuple[int, ...], expert: int | None = None) -> TensorMap:
  """An HF linear weight `[out, in]` as a jbtx kernel `[in, out]`, reshaped to `jbtx_shape`."""
  return TensorMap(hf_name, path, layer, hf_shape, jbtx_shape,
                   lambda w: w.T.reshape(jbtx_shape),
                   lambda k: k.reshape(hf_shape[1], hf_shape[0]).T, expert)


def _same(name: str, path: tuple[str, ...], layer: int | None, shape: tuple[int, ...]):
  return TensorMap(name, path, layer, shape, shape, _identity, _identity)


def _identity(x: np.ndarray) -> np.ndarray:
  return x


def dense_ffn_maps(cfg: ModelConfig, layer: int, prefix: str) -> list[TensorMap]:
  """Llama's SwiGLU `mlp.{gate,up,down}_proj` of one layer (`prefix` = "model.layers.{i}.")."""
  d, ff = cfg.d_model, cfg.d_ff
  return [linear(f"{prefix}mlp.{name}_proj.weight", ("mlp", name, "kernel"), layer, hf_shape,
                 hf_shape[::-1])
          for name, hf_shape in (("gate", (ff, d)), ("up", (ff, d)), ("down", (d, ff)))]


FFNMaps = Callable[[ModelConfig, int, str], list[TensorMap]]


def tensor_maps(cfg: ModelConfig, ffn_maps: FFNMaps = dense_ffn_maps) -> list[TensorMap]:
  """All tensors of an HF Llama-style decoder with the model shape `cfg`, in HF's order.

  Args:
    cfg: the model shape; `qk_norm` adds OLMoE's `self_attn.{q,k}_norm` weights.
    ffn_maps: the feed-forward tensors of one layer, `(cfg, layer, prefix)` -> maps;
      Llama's dense SwiGLU by default.
  """
  d, hd = cfg.d_model, cfg.head_dim
  maps = [_same("model.embed_tokens.weight", ("embed", "embedding"), None, (cfg.vocab_size, d))]
  attention = {
      "q_proj": ("q", (cfg.n_heads * hd, d), (d, cfg.n_heads, hd)),
      "k_proj": ("k", (cfg.n_kv_heads * hd, d), (d, cfg.n_kv_heads, hd)),
      "v_proj": ("v", (cfg.n_kv_heads * hd, d), (d, cfg.n_kv_heads, hd)),
      "o_proj": ("o", (d, cfg.n_heads * hd), (cfg.n_heads, hd, d)),
  }
  for i in range(cfg.n_layers):
    prefix = f"model.layers.{i}."
    for hf, (name, hf_shape, jbtx_shape) in attention.items():
      maps.append(linear(f"{prefix}self_attn.{hf}.weight", ("attn", name, "kernel"), i,
                         hf_shape, jbtx_shape))
    if cfg.qk_norm:
      for name, heads in (("q_norm", cfg.n_heads), ("k_norm", cfg.n_kv_heads)):
        maps.append(_same(f"{prefix}self_attn.{name}.weight", ("attn", name, "scale"), i,
                          (heads * hd,)))
    maps.extend(ffn_maps(cfg, i, prefix))
    for hf, path in (("input_layernorm", "attn_norm"), ("post_attention_layernorm", "mlp_norm")):
      maps.append(_same(f"{prefix}{hf}.weight", (path, "scale"), i, (d,)))
  maps.append(_same("model.norm.weight", ("final_norm", "scale"), None, (d,)))
  maps.append(TensorMap("lm_head.weight", ("lm_head", "kernel"), None, (cfg.vocab_size, d),
                        (d, cfg.vocab_size), np.transpose, np.transpose))
  return maps


# --------------------------------------------------------------------------------------
# Configs.
# --------------------------------------------------------------------------------------


def decoder_config_from_hf(hf: Mapping[str, Any], source: str, **fields: Any) -> ModelConfig:
  """ModelConfig from the keys all HF Llama-style `config.json` dicts share.

  Args:
    hf: the parsed `config.json` (Llama, Mixtral or OLMoE).
    source: names the file in errors.
    **fields: further ModelConfig fields (`qk_norm`, `moe`).
  """
  unsupported = {
      "rope_scaling": hf.get("rope_scaling") or None,
      "attention_bias": hf.get("attention_bias", False) or None,
      "mlp_bias": hf.get("mlp_bias", False) or None,
      "tie_word_embeddings": hf.get("tie_word_embeddings", False) or None,
  }
  rope = hf.get("rope_parameters") or {}
  if rope.get("rope_type", "default") != "default":
    unsupported["rope_parameters.rope_type"] = rope["rope_type"]
  for key, value in unsupported.items():
    if value is not None:
      raise ConversionError(f"{source}: {key}={value!r} is not supported by jbtx")
  if hf.get("hidden_act", "silu") != "silu":
    raise ConversionError(f"{source}: hidden_act {hf['hidden_act']!r} is not 'silu'")
  try:
    n_heads = hf["num_attention_heads"]
    cfg = ModelConfig(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        d_ff=hf["intermediate_size"],
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_seq_len=hf.get("max_position_embeddings", 4096), **fields)
  except KeyError as e:
    raise ConversionError(f"{source}: missing key {e.args[0]!r}") from None
  except ConfigError as e:
    raise ConversionError(f"{source}: {e}") from None
  if hf.get("head_dim") not in (None, cfg.head_dim):
    raise ConversionError(f"{source}: head_dim {hf['head_dim']} != hidden_size / "
                          f"num_attention_heads = {cfg.head_dim}, which jbtx requires")
  return cfg


def model_config_from_hf(hf: Mapping[str, Any], source: str) -> ModelConfig:
  """ModelConfig from an HF Llama `config.json` dict; `source` names the file in errors."""
  if hf.get("model_type") != "llama":
    raise ConversionError(f"{source}: model_type {hf.get('model_type')!r} is not 'llama'")
  return decoder_config_from_hf(hf, source)


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
      "rope_theta": cfg.rope_theta,
      "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
      "tie_word_embeddings": False,
      "torch_dtype": dtype,
      "dtype": dtype,
  }


def hf_config_from_model(cfg: ModelConfig, dtype: str) -> dict[str, Any]:
  """An HF `config.json` dict for `LlamaForCausalLM` with the shape of `cfg`."""
  if cfg.moe is not None or cfg.qk_norm:
    raise ConversionError("HF Llama has no MoE layers and no QK norm")
  return {
      "architectures": ["LlamaForCausalLM"],
      "model_type": "llama",
      **decoder_hf_config(cfg, dtype),
      "head_dim": cfg.head_dim,
      "rope_scaling": None,
      "attention_bias": False,
      "mlp_bias": False,
  }


# --------------------------------------------------------------------------------------
# Parameters.
# --------------------------------------------------------------------------------------


def check_tensors(cfg: ModelConfig, maps: list[TensorMap], shapes: Mapping[str, tuple[int, ...]],
                  where: Callable[[str], str]) -> None:
  """Raises ConversionError unless `shapes` holds exactly the tensors `maps` read.

  Args:
    cfg: the model shape, for messages.
    maps: the tensor maps of the model (`tensor_maps` or `hf_moe_map.tensor_maps`).
    shapes: tensor name -> shape, as found in the checkpoint.
    where: tensor name -> the file that holds it, for messages.
  """
  expected = {m.hf_name for m in maps}
  extra = sorted(n for n in shapes if n not in expected and not n.endswith(IGNORED_SUFFIXES))
  if extra:
    raise ConversionError(f"{where(extra[0])}: unexpected tensor {extra[0]!r} "
                          f"({len(extra)} unexpected in all)")
  size = f"{cfg.n_layers} layers" + (f", {cfg.moe.n_experts} experts" if cfg.moe else "")
  for m in maps:
    if m.hf_name not in shapes:
      raise ConversionError(f"missing tensor {m.hf_name!r} (model has {size})")
    if tuple(shapes[m.hf_name]) != m.hf_shape:
      raise ConversionError(f"{where(m.hf_name)}: tensor {m.hf_name!r} has shape "
                            f"{tuple(shapes[m.hf_name])}, expected {m.hf_shape}")


def _slot(cfg: ModelConfig, m: TensorMap) -> tuple[tuple[str, ...], tuple[int, ...]]:
  """Key path of `m`'s leaf in the model tree, and its index along the leaf's leading
  stacked axes (layer, when scanned; then expert)."""
  expert = () if m.expert is None else (m.expert,)
  if m.layer is None:
    return m.path, expert
  if cfg.scan_layers:
    return ("layers", *m.path), (m.layer, *expert)
  return (f"layers_{m.layer}", *m.path), expert


def import_leaves(cfg: ModelConfig, maps: list[TensorMap], read: Callable[[str], np.ndarray],
                  dtype: np.dtype, progress: Callable[[str], None] = lambda _: None
                  ) -> Iterator[Params]:
  """Yields the jbtx parameter tree one leaf at a time, reading HF tensors on demand.

  Each yielded value is a nested dict holding a single leaf (e.g. the stacked
  `layers/mlp/up/kernel` of all layers); together they form the whole tree. Only one
  leaf is alive at a time, so a consumer that writes and drops each one (see
  `checkpoint.save_parts`) converts a model in a fraction of its size in memory.

  Args:
    cfg: model shape.
    maps: its tensor maps (already checked against the checkpoint with `check_tensors`).
    read: HF tensor name -> array in the HF layout.
    dtype: numpy dtype of the returned parameters.
    progress: called with each HF tensor name after it is converted.
  """
  leaves: dict[tuple[str, ...], list[tuple[TensorMap, tuple[int, ...]]]] = {}
  for m in maps:
    path, index = _slot(cfg, m)
    leaves.setdefault(path, []).append((m, index))
  for path, members in leaves.items():
    stacked = tuple(1 + max(index[axis] for _, index in members)
                    for axis in range(len(members[0][1])))
    leaf = np.empty(stacked + members[0][0].jbtx_shape, dtype)
    for m, index in members:
      leaf[index] = m.to_jbtx(read(m.hf_name))
      progress(m.hf_name)
    part = traverse_util.unflatten_dict({path: leaf})
    del leaf
    yield part
    del part  # Release this leaf before the next one is allocated.


def export_tensors(cfg: ModelConfig, maps: list[TensorMap],
                   params: Params) -> Iterator[tuple[TensorMap, Callable]]:
  """Yields `(map, produce)` per HF tensor of `maps`; `produce()` returns its HF array."""
  flat = traverse_util.flatten_dict(params)
  for m in maps:
    path, index = _slot(cfg, m)

    def produce(path=path, index=index, m=m) -> np.ndarray:
      return np.ascontiguousarray(m.to_hf(np.asarray(flat[path])[index]))

    yield m, produce

"""The Hugging Face Llama layout and its one-to-one map onto jbtx parameters.

Both importers speak this layout: HF checkpoints are in it already, and Meta's
checkpoints are presented in it by `interop.meta_llama`. Export writes it back.

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

from jbtx.config import ConfigError, ModelConfig

Params = dict[str, Any]

# Tensors some checkpoints carry that hold no learned state.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class ConversionError(ValueError):
  """A checkpoint cannot be converted; the message names the tensor or file at fault."""


@dataclasses.dataclass(frozen=True)
class TensorMap:
  """Where one HF tensor lives in the jbtx tree and how to transform it.

  Attributes:
    hf_name: e.g. "model.layers.3.self_attn.q_proj.weight".
    path: key path in the jbtx tree of one layer (or of the whole model when `layer`
      is None), e.g. ("attn", "q", "kernel").
    layer: decoder layer index, or None for embeddings, final norm and output layer.
    hf_shape: the tensor's shape in the HF layout.
    jbtx_shape: its shape in the jbtx layout (of one layer).
    to_jbtx: HF array -> jbtx array.
    to_hf: jbtx array -> HF array.
  """

  hf_name: str
  path: tuple[str, ...]
  layer: int | None
  hf_shape: tuple[int, ...]
  jbtx_shape: tuple[int, ...]
  to_jbtx: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]


def _linear(hf_shape, jbtx_shape) -> tuple[Callable, Callable]:
  """Transpose `[out, in]` <-> `[in, out]` and reshape to the jbtx kernel shape."""
  return (lambda w: w.T.reshape(jbtx_shape), lambda k: k.reshape(hf_shape[1], hf_shape[0]).T)


def _same(name: str, path: tuple[str, ...], layer: int | None, shape: tuple[int, ...]):
  return TensorMap(name, path, layer, shape, shape, _identity, _identity)


def _identity(x: np.ndarray) -> np.ndarray:
  return x


def tensor_maps(cfg: ModelConfig) -> list[TensorMap]:
  """All tensors of an HF Llama with the model shape `cfg`, in HF's usual order."""
  d, hd, ff = cfg.d_model, cfg.head_dim, cfg.d_ff
  maps = [_same("model.embed_tokens.weight", ("embed", "embedding"), None, (cfg.vocab_size, d))]
  linears = {
      "self_attn.q_proj": (("attn", "q"), (cfg.n_heads * hd, d), (d, cfg.n_heads, hd)),
      "self_attn.k_proj": (("attn", "k"), (cfg.n_kv_heads * hd, d), (d, cfg.n_kv_heads, hd)),
      "self_attn.v_proj": (("attn", "v"), (cfg.n_kv_heads * hd, d), (d, cfg.n_kv_heads, hd)),
      "self_attn.o_proj": (("attn", "o"), (d, cfg.n_heads * hd), (cfg.n_heads, hd, d)),
      "mlp.gate_proj": (("mlp", "gate"), (ff, d), (d, ff)),
      "mlp.up_proj": (("mlp", "up"), (ff, d), (d, ff)),
      "mlp.down_proj": (("mlp", "down"), (d, ff), (ff, d)),
  }
  for i in range(cfg.n_layers):
    prefix = f"model.layers.{i}."
    for hf, (path, hf_shape, jbtx_shape) in linears.items():
      maps.append(TensorMap(f"{prefix}{hf}.weight", (*path, "kernel"), i, hf_shape, jbtx_shape,
                            *_linear(hf_shape, jbtx_shape)))
    for hf, path in (("input_layernorm", "attn_norm"), ("post_attention_layernorm", "mlp_norm")):
      maps.append(_same(f"{prefix}{hf}.weight", (path, "scale"), i, (d,)))
  maps.append(_same("model.norm.weight", ("final_norm", "scale"), None, (d,)))
  maps.append(TensorMap("lm_head.weight", ("lm_head", "kernel"), None, (cfg.vocab_size, d),
                        (d, cfg.vocab_size), np.transpose, np.transpose))
  return maps


# --------------------------------------------------------------------------------------
# Configs.
# --------------------------------------------------------------------------------------


def model_config_from_hf(hf: Mapping[str, Any], source: str) -> ModelConfig:
  """ModelConfig from an HF Llama `config.json` dict; `source` names the file in errors."""
  if hf.get("model_type") != "llama":
    raise ConversionError(f"{source}: model_type {hf.get('model_type')!r} is not 'llama'")
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
      raise ConversionError(f"{source}: {key}={value!r} is not supported by jbtx's Llama")
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
        max_seq_len=hf.get("max_position_embeddings", 4096))
  except KeyError as e:
    raise ConversionError(f"{source}: missing key {e.args[0]!r}") from None
  except ConfigError as e:
    raise ConversionError(f"{source}: {e}") from None
  if hf.get("head_dim", cfg.head_dim) != cfg.head_dim:
    raise ConversionError(f"{source}: head_dim {hf['head_dim']} != hidden_size / "
                          f"num_attention_heads = {cfg.head_dim}, which jbtx requires")
  return cfg


def hf_config_from_model(cfg: ModelConfig, dtype: str) -> dict[str, Any]:
  """An HF `config.json` dict for `LlamaForCausalLM` with the shape of `cfg`."""
  return {
      "architectures": ["LlamaForCausalLM"],
      "model_type": "llama",
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.d_model,
      "intermediate_size": cfg.d_ff,
      "num_hidden_layers": cfg.n_layers,
      "num_attention_heads": cfg.n_heads,
      "num_key_value_heads": cfg.n_kv_heads,
      "head_dim": cfg.head_dim,
      "hidden_act": "silu",
      "max_position_embeddings": cfg.max_seq_len,
      "rms_norm_eps": cfg.norm_eps,
      "rope_theta": cfg.rope_theta,
      "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
      "rope_scaling": None,
      "attention_bias": False,
      "mlp_bias": False,
      "tie_word_embeddings": False,
      "torch_dtype": dtype,
      "dtype": dtype,
  }


# --------------------------------------------------------------------------------------
# Parameters.
# --------------------------------------------------------------------------------------


def check_tensors(cfg: ModelConfig, shapes: Mapping[str, tuple[int, ...]],
                  where: Callable[[str], str]) -> None:
  """Raises ConversionError unless `shapes` holds exactly the tensors `cfg` needs.

  Args:
    cfg: the model shape.
    shapes: tensor name -> shape, as found in the checkpoint.
    where: tensor name -> the file that holds it, for messages.
  """
  maps = tensor_maps(cfg)
  expected = {m.hf_name for m in maps}
  extra = sorted(n for n in shapes if n not in expected and not n.endswith(IGNORED_SUFFIXES))
  if extra:
    raise ConversionError(f"{where(extra[0])}: unexpected tensor {extra[0]!r} "
                          f"({len(extra)} unexpected in all)")
  for m in maps:
    if m.hf_name not in shapes:
      raise ConversionError(f"missing tensor {m.hf_name!r} (model has {cfg.n_layers} layers)")
    if tuple(shapes[m.hf_name]) != m.hf_shape:
      raise ConversionError(f"{where(m.hf_name)}: tensor {m.hf_name!r} has shape "
                            f"{tuple(shapes[m.hf_name])}, expected {m.hf_shape}")


def _slot(cfg: ModelConfig, m: TensorMap) -> tuple[tuple[str, ...], int | None]:
  """Key path of `m` in the model tree, and the index along the stacked layer axis."""
  if m.layer is None:
    return m.path, None
  if cfg.scan_layers:
    return ("layers", *m.path), m.layer
  return (f"layers_{m.layer}", *m.path), None


def import_leaves(cfg: ModelConfig, read: Callable[[str], np.ndarray], dtype: np.dtype,
                  progress: Callable[[str], None] = lambda _: None) -> Iterator[Params]:
  """Yields the jbtx parameter tree one leaf at a time, reading HF tensors on demand.

  Each yielded value is a nested dict holding a single leaf (e.g. the stacked
  `layers/mlp/up/kernel` of all layers); together they form the whole tree. Only one
  leaf is alive at a time, so a consumer that writes and drops each one (see
  `checkpoint.save_parts`) converts a model in a fraction of its size in memory.

  Args:
    cfg: model shape (tensors must already be checked with `check_tensors`).
    read: HF tensor name -> array in the HF layout.
    dtype: numpy dtype of the returned parameters.
    progress: called with each HF tensor name after it is converted.
  """
  leaves: dict[tuple[str, ...], list[tuple[TensorMap, int | None]]] = {}
  for m in tensor_maps(cfg):
    path, index = _slot(cfg, m)
    leaves.setdefault(path, []).append((m, index))
  for path, members in leaves.items():
    first = members[0][0]
    stacked = members[0][1] is not None
    leaf = np.empty(((len(members),) if stacked else ()) + first.jbtx_shape, dtype)
    for m, index in members:
      value = m.to_jbtx(read(m.hf_name))
      if stacked:
        leaf[index] = value
      else:
        leaf[...] = value
      progress(m.hf_name)
    part: Params = {}
    _set(part, path, leaf)
    del leaf
    yield part
    del part  # Release this leaf before the next one is allocated.


def export_tensors(cfg: ModelConfig, params: Params) -> Iterator[tuple[TensorMap, Callable]]:
  """Yields `(map, produce)` per HF tensor; `produce()` returns its HF-layout array."""
  for m in tensor_maps(cfg):
    path, index = _slot(cfg, m)

    def produce(path=path, index=index, m=m) -> np.ndarray:
      value = np.asarray(_get(params, path))
      return np.ascontiguousarray(m.to_hf(value if index is None else value[index]))

    yield m, produce


def _get(tree: Params, path: tuple[str, ...]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def _set(tree: Params, path: tuple[str, ...], value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value

"""The Hugging Face Llama layout and its map onto jbtx parameters.

Both Llama importers speak this layout: HF checkpoints are in it already, and Meta's
checkpoints are presented in it by `interop.meta_llama`. Export writes it back. HF's
Qwen2 is the same with q/k/v biases; Mixtral and OLMoE share it except for their
feed-forward layers (`interop.hf_moe_map`). `interop.hf_config` reads and writes the
models' `config.json`.

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

from jbtx.config import ModelConfig

Params = dict[str, Any]

# Tensors some checkpoints carry that hold no learned state.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
EMBEDDING, HEAD = "model.embed_tokens.weight", "lm_head.weight"


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


def attention_maps(cfg: ModelConfig, layer: int, prefix: str) -> list[TensorMap]:
  """`self_attn.{q,k,v,o}_proj` of one layer: weights, the biases of `cfg.attention_bias`
  (HF `[out]`, jbtx `[heads, head_dim]` or `[embed]`) and OLMoE's q/k norms."""
  d, hd = cfg.d_model, cfg.head_dim
  attention = {
      "q_proj": ("q", (cfg.n_heads * hd, d), (d, cfg.n_heads, hd)),
      "k_proj": ("k", (cfg.n_kv_heads * hd, d), (d, cfg.n_kv_heads, hd)),
      "v_proj": ("v", (cfg.n_kv_heads * hd, d), (d, cfg.n_kv_heads, hd)),
      "o_proj": ("o", (d, cfg.n_heads * hd), (cfg.n_heads, hd, d)),
  }
  biased = {"none": (), "qkv": ("q", "k", "v"), "qkvo": ("q", "k", "v", "o")}
  maps = []
  for hf, (name, hf_shape, jbtx_shape) in attention.items():
    maps.append(linear(f"{prefix}self_attn.{hf}.weight", ("attn", name, "kernel"), layer,
                       hf_shape, jbtx_shape))
    if name in biased[cfg.attention_bias]:
      out_shape = (d,) if name == "o" else jbtx_shape[1:]
      maps.append(TensorMap(f"{prefix}self_attn.{hf}.bias", ("attn", name, "bias"), layer,
                            hf_shape[:1], out_shape, lambda b, s=out_shape: b.reshape(s),
                            lambda b: b.reshape(-1)))
  if cfg.qk_norm:
    for name, heads in (("q_norm", cfg.n_heads), ("k_norm", cfg.n_kv_heads)):
      maps.append(_same(f"{prefix}self_attn.{name}.weight", ("attn", name, "scale"), layer,
                        (heads * hd,)))
  return maps


def tensor_maps(cfg: ModelConfig, ffn_maps: FFNMaps = dense_ffn_maps) -> list[TensorMap]:
  """All tensors of an HF Llama-style decoder with the model shape `cfg`, in HF's order.

  Args:
    cfg: the model shape; `qk_norm` adds OLMoE's `self_attn.{q,k}_norm` weights.
    ffn_maps: the feed-forward tensors of one layer, `(cfg, layer, prefix)` -> maps;
      Llama's dense SwiGLU by default.
  """
  d = cfg.d_model
  maps = [_same(EMBEDDING, ("embed", "embedding"), None, (cfg.vocab_size, d))]
  for i in range(cfg.n_layers):
    prefix = f"model.layers.{i}."
    maps.extend(attention_maps(cfg, i, prefix))
    maps.extend(ffn_maps(cfg, i, prefix))
    for hf, path in (("input_layernorm", "attn_norm"), ("post_attention_layernorm", "mlp_norm")):
      maps.append(_same(f"{prefix}{hf}.weight", (path, "scale"), i, (d,)))
  maps.append(_same("model.norm.weight", ("final_norm", "scale"), None, (d,)))
  if not cfg.tie_embeddings:
    maps.append(TensorMap(HEAD, ("lm_head", "kernel"), None, (cfg.vocab_size, d),
                          (d, cfg.vocab_size), np.transpose, np.transpose))
  return maps


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


def without_tied_head(cfg: ModelConfig, shapes: Mapping[str, tuple[int, ...]],
                      read: Callable[[str], np.ndarray],
                      where: Callable[[str], str]) -> dict[str, tuple[int, ...]]:
  """`shapes` without the `lm_head.weight` a tied model's checkpoint may still carry,
  once it is checked to equal the embedding table (a differing one is refused, never
  dropped); `shapes` as it is for an untied model or a checkpoint without one."""
  if not cfg.tie_embeddings or HEAD not in shapes:
    return dict(shapes)
  same = (shapes[HEAD] == shapes.get(EMBEDDING)
          and np.array_equal(read(HEAD), read(EMBEDDING)))
  if not same:
    raise ConversionError(f"{where(HEAD)}: tensor {HEAD!r} differs from {EMBEDDING!r}, but "
                          "tie_word_embeddings=True ties them; set tie_word_embeddings to "
                          "false in config.json to import both")
  return {name: shape for name, shape in shapes.items() if name != HEAD}


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

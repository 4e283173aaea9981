"""Meta's original Llama-2 release format, presented in the Hugging Face layout.

A Meta checkpoint is a folder with `params.json` and model-parallel shards
`consolidated.00.pth … consolidated.NN.pth` (1 for 7B, 2 for 13B, 8 for 70B). Each
shard holds a slice of every parallel tensor: column-parallel weights (wq, wk, wv, w1,
w3, output) are split along rows (axis 0), row-parallel ones (wo, w2) and the
embedding along columns (axis 1); norms are replicated.

Meta rotates adjacent feature pairs in rotary embeddings, jbtx (like HF) rotates
halves, so wq and wk rows are permuted per head on the way in (`_to_rotate_half`).
"""

from __future__ import annotations

import json
import pathlib
import re

import numpy as np

from jbtx.config import ConfigError, ModelConfig
from jbtx.interop.hf_tensor_map import ConversionError
from jbtx.interop.tensor_files import TensorFileError, TensorReader, open_tensor_file

# Meta name pattern -> (HF name template, shard concat axis or None if replicated).
_NAMES: list[tuple[str, str, int | None]] = [
    (r"tok_embeddings\.weight", "model.embed_tokens.weight", 1),
    (r"norm\.weight", "model.norm.weight", None),
    (r"output\.weight", "lm_head.weight", 0),
    (r"layers\.(\d+)\.attention\.wq\.weight", "model.layers.{}.self_attn.q_proj.weight", 0),
    (r"layers\.(\d+)\.attention\.wk\.weight", "model.layers.{}.self_attn.k_proj.weight", 0),
    (r"layers\.(\d+)\.attention\.wv\.weight", "model.layers.{}.self_attn.v_proj.weight", 0),
    (r"layers\.(\d+)\.attention\.wo\.weight", "model.layers.{}.self_attn.o_proj.weight", 1),
    (r"layers\.(\d+)\.feed_forward\.w1\.weight", "model.layers.{}.mlp.gate_proj.weight", 0),
    (r"layers\.(\d+)\.feed_forward\.w2\.weight", "model.layers.{}.mlp.down_proj.weight", 1),
    (r"layers\.(\d+)\.feed_forward\.w3\.weight", "model.layers.{}.mlp.up_proj.weight", 0),
    (r"layers\.(\d+)\.attention_norm\.weight", "model.layers.{}.input_layernorm.weight", None),
    (r"layers\.(\d+)\.ffn_norm\.weight", "model.layers.{}.post_attention_layernorm.weight",
     None),
]
_IGNORED = {"rope.freqs"}


def _to_rotate_half(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Reorders each head's rows from interleaved pairs (0,1),(2,3)… to halves.

  `w` is `[n_heads * head_dim, in]`; within a head, row 2i becomes row i and row 2i+1
  becomes row i + head_dim/2 (the permutation of HF's `convert_llama_weights_to_hf`).
  """
  rows, cols = w.shape
  half = rows // n_heads // 2
  return w.reshape(n_heads, half, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _meta_d_ff(d_model: int, multiple_of: int, multiplier: float | None) -> int:
  hidden = int(2 * 4 * d_model / 3)
  if multiplier is not None:
    hidden = int(multiplier * hidden)
  return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


class MetaCheckpoint:
  """Read-only view of a Meta Llama-2 folder as HF-named, HF-layout tensors."""

  def __init__(self, directory: pathlib.Path):
    self.directory = directory
    self.params = self._read_params_json()
    self.readers = self._open_shards()
    self._sources: dict[str, tuple[str, int | None]] = {}  # hf name -> (meta name, axis)
    self.shapes: dict[str, tuple[int, ...]] = {}
    self._index_tensors()
    self.model_config = self._model_config()

  def _read_params_json(self) -> dict:
    path = self.directory / "params.json"
    try:
      return json.loads(path.read_text())
    except json.JSONDecodeError as e:
      raise ConversionError(f"{path}: not valid JSON ({e})") from None

  def _open_shards(self) -> list[TensorReader]:
    paths = sorted(self.directory.glob("consolidated.*.pth"))
    if not paths:
      raise ConversionError(f"{self.directory}: params.json found but no consolidated.*.pth")
    for i, path in enumerate(paths):
      if path.name != f"consolidated.{i:02d}.pth":
        raise ConversionError(f"{path}: expected shard consolidated.{i:02d}.pth here; "
                              f"shards must be numbered 00..{len(paths) - 1:02d}")
    return [open_tensor_file(p) for p in paths]

  def _index_tensors(self) -> None:
    first = self.readers[0]
    names = set(first.infos()) - _IGNORED
    for reader in self.readers[1:]:
      other = set(reader.infos()) - _IGNORED
      if other != names:
        odd = sorted(other ^ names)[0]
        raise ConversionError(f"shards disagree: tensor {odd!r} is in only one of "
                              f"{first.path.name} and {reader.path.name}")
    for name in first.infos():
      if name in _IGNORED:
        continue
      hf_name, axis = self._hf_name(name)
      self._sources[hf_name] = (name, axis)
      self.shapes[hf_name] = self._joined_shape(name, axis)

  def _hf_name(self, name: str) -> tuple[str, int | None]:
    for pattern, template, axis in _NAMES:
      match = re.fullmatch(pattern, name)
      if match:
        return template.format(*match.groups()), axis
    raise ConversionError(f"{self.readers[0].path}: unexpected tensor {name!r} in a Meta "
                          "Llama checkpoint")

  def _joined_shape(self, name: str, axis: int | None) -> tuple[int, ...]:
    shapes = [r.infos()[name].shape for r in self.readers]
    for reader, shape in zip(self.readers, shapes, strict=False):
      rest = [s for i, s in enumerate(shape) if i != axis]
      if len(shape) != len(shapes[0]) or rest != [s for i, s in enumerate(shapes[0])
                                                   if i != axis]:
        raise ConversionError(f"shards disagree on tensor {name!r}: {reader.path.name} has "
                              f"shape {shape}, {self.readers[0].path.name} has {shapes[0]}")
    if axis is None:
      return shapes[0]
    joined = list(shapes[0])
    joined[axis] = sum(s[axis] for s in shapes)
    return tuple(joined)

  def _model_config(self) -> ModelConfig:
    p, source = self.params, self.directory / "params.json"
    try:
      d_model, n_heads = p["dim"], p["n_heads"]
      embed = self.shapes.get("model.embed_tokens.weight")
      gate = self.shapes.get("model.layers.0.mlp.gate_proj.weight")
      vocab = p.get("vocab_size", -1)
      d_ff = (gate[0] if gate else
              _meta_d_ff(d_model, p.get("multiple_of", 256), p.get("ffn_dim_multiplier")))
      return ModelConfig(
          vocab_size=embed[0] if vocab in (-1, None) and embed else vocab,
          d_model=d_model, n_layers=p["n_layers"], n_heads=n_heads,
          n_kv_heads=p.get("n_kv_heads") or n_heads, d_ff=d_ff,
          rope_theta=float(p.get("rope_theta", 10000.0)), norm_eps=float(p["norm_eps"]),
          max_seq_len=4096)
    except KeyError as e:
      raise ConversionError(f"{source}: missing key {e.args[0]!r}") from None
    except (ConfigError, TypeError) as e:
      raise ConversionError(f"{source}: {e}") from None

  def where(self, hf_name: str) -> str:
    """The file(s) holding `hf_name`, for messages."""
    if hf_name not in self._sources:
      return str(self.directory)
    return f"{self.directory}/consolidated.*.pth ({self._sources[hf_name][0]})"

  def read(self, hf_name: str) -> np.ndarray:
    """The full tensor in the HF layout: shards joined, q/k rows in rotate-half order."""
    name, axis = self._sources[hf_name]
    parts = [self._read_part(r, name) for r in self.readers]
    if axis is None:
      for reader, part in zip(self.readers[1:], parts[1:], strict=False):
        if not np.array_equal(part, parts[0]):
          raise ConversionError(f"shards disagree on replicated tensor {name!r}: "
                                f"{reader.path.name} differs from {self.readers[0].path.name}")
      value = parts[0]
    else:
      value = np.concatenate(parts, axis=axis)
    del parts
    if name.endswith("attention.wq.weight"):
      value = _to_rotate_half(value, self.model_config.n_heads)
    elif name.endswith("attention.wk.weight"):
      value = _to_rotate_half(value, self.model_config.n_kv_heads)
    return value

  @staticmethod
  def _read_part(reader: TensorReader, name: str) -> np.ndarray:
    try:
      return reader.read(name)
    except TensorFileError as e:
      raise ConversionError(str(e)) from None

  def close(self) -> None:
    for reader in self.readers:
      reader.close()


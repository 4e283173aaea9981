"""Tokenizers: byte-level (no files, for the demo), SentencePiece and Hugging Face.

All three share one interface: `vocab_size`, `bos_id`, `eos_id`, `pad_id`,
`encode(text, add_bos, add_eos) -> int32 [n]` and `decode(ids) -> str`. Like Llama-2,
`encode` prepends BOS by default and appends EOS only on request; the text itself is
tokenized without special tokens. A model whose own tokenizer adds no BOS (Qwen2,
SmolLM2) has `bos_id` None, and `add_bos` then adds nothing. The data pipeline ends
every document with EOS, so EOS is the document separator.

A Hugging Face tokenizer takes BOS and EOS from the model's files next to its
`tokenizer.json`, as transformers does (`model_specials`).
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np

from jbtx.config.data import TokenizerConfig


class Tokenizer(Protocol):
  vocab_size: int
  bos_id: int | None
  eos_id: int
  pad_id: int

  def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> np.ndarray: ...

  def decode(self, ids) -> str: ...


def _with_specials(ids, bos: int | None, eos: int | None) -> np.ndarray:
  """`[bos] + ids + [eos]` (each special only when not None) as int32 `[n]`."""
  out = np.empty(len(ids) + (bos is not None) + (eos is not None), np.int32)
  start = 0
  if bos is not None:
    out[0] = bos
    start = 1
  out[start:start + len(ids)] = ids
  if eos is not None:
    out[-1] = eos
  return out


class ByteTokenizer:
  """UTF-8 bytes as tokens 0..255, plus BOS (256), EOS (257) and PAD (258)."""

  bos_id = 256
  eos_id = 257
  pad_id = 258
  vocab_size = 259

  def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> np.ndarray:
    """`text` -> int32 token ids `[n]`."""
    ids = np.frombuffer(text.encode("utf-8", errors="replace"), np.uint8)
    return _with_specials(ids, self.bos_id if add_bos else None,
                          self.eos_id if add_eos else None)

  def decode(self, ids) -> str:
    """Token ids -> text; special tokens are dropped, invalid UTF-8 replaced."""
    ids = np.asarray(ids).ravel()
    return ids[(ids >= 0) & (ids < 256)].astype(np.uint8).tobytes().decode(
        "utf-8", errors="replace")


def _check_file(path: str, kind: str, name_in_folder: str) -> pathlib.Path:
  """`path`, or `path/name_in_folder` if `path` is a folder; it must exist."""
  file = pathlib.Path(path).expanduser()
  if file.is_dir():
    file = file / name_in_folder
  if not file.is_file():
    raise FileNotFoundError(f"{kind} tokenizer file {file} does not exist "
                            "(config key 'data.tokenizer.path')")
  return file


class SentencePieceTokenizer:
  """A SentencePiece model such as Llama-2's `tokenizer.model` (BOS 1, EOS 2).

  Pads with the model's pad id, or with EOS when it has none (Llama-2: pad -1).
  """

  def __init__(self, path: str):
    import sentencepiece

    file = _check_file(path, "sentencepiece", "tokenizer.model")
    self._sp = sentencepiece.SentencePieceProcessor()
    try:
      self._sp.Load(str(file))
    except (OSError, RuntimeError) as e:
      raise ValueError(f"{file} is not a SentencePiece model: {e}") from None
    self.vocab_size = self._sp.GetPieceSize()
    self.bos_id, self.eos_id = self._sp.bos_id(), self._sp.eos_id()
    if self.bos_id < 0 or self.eos_id < 0:
      raise ValueError(f"SentencePiece model {file} defines no BOS or EOS piece "
                       f"(bos_id {self.bos_id}, eos_id {self.eos_id})")
    self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id

  def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> np.ndarray:
    return _with_specials(self._sp.EncodeAsIds(text), self.bos_id if add_bos else None,
                          self.eos_id if add_eos else None)

  def decode(self, ids) -> str:
    return self._sp.DecodeIds([int(i) for i in np.asarray(ids).ravel()
                               if 0 <= int(i) < self.vocab_size])


# Files next to a `tokenizer.json` that name the model's special tokens, in the order
# they are read (the token strings of the first two; the ids of the model's config.json).
COMPANION_FILES = ("tokenizer_config.json", "special_tokens_map.json", "config.json")
# A `tokenizer.json` alone: Llama-2's special tokens.
_BARE_BOS, _BARE_EOS = "<s>", "</s>"


def _read_json(path: pathlib.Path) -> dict[str, Any]:
  try:
    data = json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: not a readable JSON file ({e})") from None
  if not isinstance(data, Mapping):
    raise ValueError(f"{path}: expected a JSON object")
  return dict(data)


def _content(value: Any) -> str | None:
  """A special token's string: given as such, or as an AddedToken dict `{"content": …}`."""
  return value.get("content") if isinstance(value, Mapping) else value


class HuggingFaceTokenizer:
  """A Hugging Face `tokenizer.json` (the file, or the folder holding it).

  Special tokens given by name (`bos_token`, `eos_token`, `pad_token`) are looked up in
  the vocabulary. Those left "" are the model's own (`model_specials`): from the files
  next to `tokenizer.json`, or Llama-2's "<s>" and "</s>" for a `tokenizer.json` alone.
  PAD "" pads with EOS.
  """

  def __init__(self, path: str, bos_token: str = "", eos_token: str = "", pad_token: str = ""):
    import tokenizers

    file = _check_file(path, "huggingface", "tokenizer.json")
    try:
      self._tok = tokenizers.Tokenizer.from_file(str(file))
    except Exception as e:  # The Rust library raises a bare Exception on parse errors.
      raise ValueError(f"{file} is not a Hugging Face tokenizer.json: {e}") from None
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    own = None if bos_token and eos_token else self.model_specials(file.parent)
    if own is None:  # named in the config, or a tokenizer.json alone
      bos_token, eos_token = bos_token or _BARE_BOS, eos_token or _BARE_EOS
    self.bos_id = self._token_id(file, "bos_token", bos_token) if bos_token else own[0]
    self.eos_id = self._token_id(file, "eos_token", eos_token) if eos_token else own[1]
    self.pad_id = self._token_id(file, "pad_token", pad_token) if pad_token else self.eos_id

  def _token_id(self, file: pathlib.Path, key: str, token: str) -> int:
    token_id = self._tok.token_to_id(token)
    if token_id is None:
      raise ValueError(f"config key 'data.tokenizer.{key}': token {token!r} is not in "
                       f"the vocabulary of {file}")
    return token_id

  def model_specials(self, directory: pathlib.Path) -> tuple[int | None, int] | None:
    """`(bos_id, eos_id)` as the model's own tokenizer uses them, from the
    `COMPANION_FILES` in `directory`; None if there are none.

    EOS: `eos_token` of tokenizer_config.json, else of special_tokens_map.json, else
    `eos_token_id` of config.json. BOS: what tokenizer.json's post-processor prepends
    (none without one), as transformers 5 adds it: next to a tokenizer.json it ignores
    tokenizer_config.json's `add_bos_token`.
    """
    found = {n: _read_json(directory / n) for n in COMPANION_FILES if (directory / n).is_file()}
    if not found:
      return None
    for name in COMPANION_FILES[:2]:
      token = _content(found.get(name, {}).get("eos_token"))
      if token is not None:
        return self._prepended(), self._token_id(directory / name, "eos_token", token)
    eos = found.get("config.json", {}).get("eos_token_id")
    if isinstance(eos, list):  # several EOS ids: the first is the model's
      eos = eos[0] if eos else None
    if eos is None:
      raise ValueError(f"{directory}: no EOS token in {', '.join(found)}; set config key "
                       "'data.tokenizer.eos_token'")
    return self._prepended(), eos

  def _prepended(self) -> int | None:
    """The special token tokenizer.json's post-processor puts before a text, if any."""
    plain = self._tok.encode("a", add_special_tokens=False).ids
    full = self._tok.encode("a", add_special_tokens=True).ids
    return full[0] if len(full) > len(plain) and full[1:len(plain) + 1] == plain else None

  def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> np.ndarray:
    ids = self._tok.encode(text, add_special_tokens=False).ids
    return _with_specials(ids, self.bos_id if add_bos else None,
                          self.eos_id if add_eos else None)

  def decode(self, ids) -> str:
    return self._tok.decode([int(i) for i in np.asarray(ids).ravel()],
                            skip_special_tokens=True)


def make(config: TokenizerConfig) -> Tokenizer:
  """The tokenizer `config` describes; file errors name the file."""
  if config.type == "sentencepiece":
    return SentencePieceTokenizer(config.path)
  if config.type == "huggingface":
    return HuggingFaceTokenizer(config.path, config.bos_token, config.eos_token,
                                config.pad_token)
  return ByteTokenizer()

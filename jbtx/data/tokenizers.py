"""Tokenizers: byte-level (no files, for the demo), SentencePiece and Hugging Face.

All three share one interface: `vocab_size`, `bos_id`, `eos_id`, `pad_id`,
`encode(text, add_bos, add_eos) -> int32 [n]` and `decode(ids) -> str`. Like Llama-2,
`encode` prepends BOS by default and appends EOS only on request; the text itself is
tokenized without special tokens.
"""

from __future__ import annotations

import pathlib
from typing import Protocol

import numpy as np

from jbtx.config.data import TokenizerConfig


class Tokenizer(Protocol):
  vocab_size: int
  bos_id: int
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


def _check_file(path: str, kind: str) -> pathlib.Path:
  file = pathlib.Path(path).expanduser()
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

    file = _check_file(path, "sentencepiece")
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


class HuggingFaceTokenizer:
  """A Hugging Face `tokenizer.json`; BOS/EOS/PAD looked up by their token strings."""

  def __init__(self, path: str, bos_token: str, eos_token: str, pad_token: str):
    import tokenizers

    file = _check_file(path, "huggingface")
    try:
      self._tok = tokenizers.Tokenizer.from_file(str(file))
    except Exception as e:  # The Rust library raises a bare Exception on parse errors.
      raise ValueError(f"{file} is not a Hugging Face tokenizer.json: {e}") from None
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    self.bos_id = self._token_id(file, "bos_token", bos_token)
    self.eos_id = self._token_id(file, "eos_token", eos_token)
    self.pad_id = self._token_id(file, "pad_token", pad_token) if pad_token else self.eos_id

  def _token_id(self, file: pathlib.Path, key: str, token: str) -> int:
    token_id = self._tok.token_to_id(token)
    if token_id is None:
      raise ValueError(f"config key 'data.tokenizer.{key}': token {token!r} is not in "
                       f"the vocabulary of {file}")
    return token_id

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

"""Tensor-at-a-time reading and writing of safetensors and PyTorch checkpoint files.

Converting a checkpoint must not hold much more than one copy of the model in memory, so
readers parse only a file's index when opened and `read` fetches just the requested
tensor's bytes (plain seek + read, no mmap), while `write_safetensors` asks for tensors
one at a time and streams them to disk.

This module holds the readers' shared interface (`TensorReader`, `FileReader`,
`TensorInfo`, `TensorFileError`), the safetensors reader and writer, and
`open_tensor_file`, which picks the reader by suffix; PyTorch's zip archives are read
without torch by `jbtx.interop.torch_files`.

Data is little-endian on disk and returned in native byte order: little-endian hosts only.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import struct
from collections.abc import Callable, Sequence
from typing import Any, BinaryIO, Protocol, TypeVar

import ml_dtypes
import numpy as np

from jbtx.runtime import files

# (safetensors dtype tag, torch typed-storage class, numpy dtype) of each supported dtype.
DTYPES = (
  ("F64", "DoubleStorage", np.float64),
  ("F32", "FloatStorage", np.float32),
  ("F16", "HalfStorage", np.float16),
  ("BF16", "BFloat16Storage", ml_dtypes.bfloat16),
  ("I64", "LongStorage", np.int64),
  ("I32", "IntStorage", np.int32),
  ("I16", "ShortStorage", np.int16),
  ("I8", "CharStorage", np.int8),
  ("U8", "ByteStorage", np.uint8),
  ("BOOL", "BoolStorage", np.bool_),
)
_SAFETENSORS_DTYPES = {tag: np.dtype(dtype) for tag, _, dtype in DTYPES}
_SAFETENSORS_TAGS = {np.dtype(dtype): tag for tag, _, dtype in DTYPES}
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # The reference safetensors implementation's limit.


class TensorFileError(ValueError):
  """A checkpoint file is unreadable, truncated, or not what it claims to be.

  The message names the file, and the tensor when one is involved.
  """


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """Name, shape and numpy dtype (bfloat16 is `ml_dtypes.bfloat16`) of one tensor."""

  name: str
  shape: tuple[int, ...]
  dtype: np.dtype


class TensorReader(Protocol):
  """Random access to the tensors of one checkpoint file; also a context manager."""

  path: pathlib.Path

  def infos(self) -> dict[str, TensorInfo]:
    """Returns every tensor's info, keyed by name, in file order."""

  def read(self, name: str) -> np.ndarray:
    """Returns a fresh, writable, C-contiguous array of one tensor, reading only its bytes."""

  def close(self) -> None:
    """Closes the file."""

  def __enter__(self) -> TensorReader: ...

  def __exit__(self, *exc_info: object) -> None: ...


_R = TypeVar("_R", bound="FileReader")


class FileReader:
  """What the readers share: the open file, the tensor index and `with` support.

  Readers are not thread-safe: their reads share one file position.
  """

  path: pathlib.Path
  _file: BinaryIO
  _infos: dict[str, TensorInfo]

  def __init__(self, path: str | os.PathLike[str]):
    self.path = pathlib.Path(path)
    self._file = open(self.path, "rb")  # noqa: SIM115 -- closed by close().
    try:
      self._index(os.fstat(self._file.fileno()).st_size)
    except BaseException:
      self._file.close()
      raise

  def _index(self, file_size: int) -> None:
    """Reads and validates the file's index into `_infos`."""
    raise NotImplementedError

  def infos(self) -> dict[str, TensorInfo]:
    return dict(self._infos)

  def _info(self, name: str) -> TensorInfo:
    if name not in self._infos:
      raise KeyError(f"{self.path}: no tensor named {name!r}")
    return self._infos[name]

  def close(self) -> None:
    self._file.close()

  def __enter__(self: _R) -> _R:
    return self

  def __exit__(self, *exc_info: object) -> None:
    self.close()


def read_into(file: BinaryIO, offset: int, out: np.ndarray, where: str) -> None:
  """Fills the C-contiguous array `out` with the bytes of `file` from `offset` on."""
  buffer = memoryview(out.reshape(-1).view(np.uint8))
  file.seek(offset)
  filled = 0
  while filled < len(buffer):
    count = file.readinto(buffer[filled:])
    if not count:
      raise TensorFileError(f"{where}: the file ends early (truncated?)")
    filled += count


class SafetensorsReader(FileReader):
  """Reads tensors one at a time from a safetensors file.

  The whole header is validated on opening, so a truncated or malformed file fails there
  rather than halfway through a conversion.

  Attributes:
    path: The file.
    metadata: The header's free-form `__metadata__` string map (empty when absent).
  """

  def _index(self, file_size: int) -> None:
    prefix = self._file.read(8)
    header_size = int.from_bytes(prefix, "little")
    if len(prefix) < 8 or header_size > min(_MAX_HEADER_BYTES, file_size - 8):
      raise TensorFileError(f"{self.path}: no valid safetensors header (truncated?)")
    try:
      header = json.loads(self._file.read(header_size))
    except ValueError as e:
      raise TensorFileError(f"{self.path}: safetensors header is not valid JSON") from e
    metadata = header.pop("__metadata__", {}) if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
      raise TensorFileError(f"{self.path}: malformed safetensors header")
    self.metadata: dict[str, str] = metadata
    data_start = 8 + header_size
    entries = []
    for name, entry in header.items():
      where = f"{self.path}: tensor {name!r}"
      malformed = TensorFileError(f"{where}: malformed or unsupported header entry {entry!r}")
      try:
        dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
        shape = tuple(entry["shape"])
        begin, end = entry["data_offsets"]
      except (KeyError, TypeError, ValueError):
        raise malformed from None
      valid = all(type(n) is int and n >= 0 for n in (*shape, begin, end))
      if not valid or end - begin != math.prod(shape) * dtype.itemsize:
        raise malformed
      if data_start + end > file_size:
        raise TensorFileError(
          f"{where}: ends at byte {data_start + end} of a {file_size}-byte file (truncated?)"
        )
      entries.append((begin, TensorInfo(name, shape, dtype)))
    entries.sort(key=lambda entry: entry[0])
    self._infos = {info.name: info for _, info in entries}
    self._offsets = {info.name: data_start + begin for begin, info in entries}

  def read(self, name: str) -> np.ndarray:
    info = self._info(name)
    out = np.empty(info.shape, info.dtype)
    read_into(self._file, self._offsets[name], out, f"{self.path}: tensor {name!r}")
    return out


def open_tensor_file(path: str | os.PathLike[str]) -> TensorReader:
  """Opens a `.safetensors` file, or a `.pth`, `.bin` or `.pt` torch.save file."""
  path = pathlib.Path(path)
  if path.suffix.lower() == ".safetensors":
    return SafetensorsReader(path)
  if path.suffix.lower() in (".pth", ".bin", ".pt"):
    from jbtx.interop.torch_files import TorchZipReader  # it builds on this module's reader

    return TorchZipReader(path)
  raise TensorFileError(f"{path}: unknown suffix; expected .safetensors, .pth, .bin or .pt")


def write_safetensors(
  path: str | os.PathLike[str],
  infos: Sequence[TensorInfo],
  produce: Callable[[str], np.ndarray],
  metadata: dict[str, str] | None = None,
) -> None:
  """Streams tensors to a safetensors file, holding one tensor in memory at a time.

  Writes the header from `infos`, then calls `produce(name)` once per tensor, in order,
  and writes its bytes. Everything goes to a temporary file next to `path`, renamed into
  place only once complete, so an interrupted write never leaves a file at `path`.

  Args:
    path: The file to create or replace.
    infos: The tensors to write, in file order.
    produce: Returns the array for a tensor name; its shape and dtype must match the info.
    metadata: Optional string-to-string map, stored as the header's `__metadata__`.

  Raises:
    TensorFileError: On an unsupported dtype, a repeated name, non-string metadata, or a
      produced array whose shape or dtype differs from its info.
  """
  path = pathlib.Path(path)
  header: dict[str, Any] = {}
  if metadata is not None:
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
      raise TensorFileError(f"{path}: metadata must map strings to strings")
    header["__metadata__"] = dict(metadata)
  start = 0
  for info in infos:
    dtype = np.dtype(info.dtype)
    if dtype not in _SAFETENSORS_TAGS or info.name in header:
      raise TensorFileError(f"{path}: tensor {info.name!r}: unsupported dtype or repeated name")
    end = start + math.prod(info.shape) * dtype.itemsize
    header[info.name] = {
      "dtype": _SAFETENSORS_TAGS[dtype],
      "shape": list(info.shape),
      "data_offsets": [start, end],
    }
    start = end
  encoded = json.dumps(header, separators=(",", ":")).encode()
  encoded += b" " * (-len(encoded) % 8)  # Aligns the data to 8 bytes, as safetensors does.

  def write(f) -> None:
    f.write(struct.pack("<Q", len(encoded)))
    f.write(encoded)
    for info in infos:
      array = np.asarray(produce(info.name))
      if array.shape != tuple(info.shape) or array.dtype != info.dtype:
        raise TensorFileError(
          f"{path}: tensor {info.name!r}: produced {array.dtype}{list(array.shape)}, "
          f"expected {np.dtype(info.dtype)}{list(info.shape)}"
        )
      f.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8))

  files.write_atomically(path, write)

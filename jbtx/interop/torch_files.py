"""PyTorch checkpoint files (`torch.save` zip archives) read one tensor at a time,
without torch.

A `torch.save` file is a zip archive holding a pickle (`<folder>/data.pkl`) whose
tensors point into raw, uncompressed storage records (`<folder>/data/<key>`). The pickle
is decoded by a restricted unpickler that accepts only the few globals a tensor state
dict uses, so opening a checkpoint never runs its code.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import operator
import pathlib
import pickle
import struct
import zipfile
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from jbtx.interop.tensor_files import DTYPES, FileReader, TensorFileError, TensorInfo, read_into

_TORCH_STORAGE_DTYPES = {storage: np.dtype(dtype) for _, storage, dtype in DTYPES}
# Legacy (pre-1.6, non-zip) torch.save files start with this pickled magic number.
_LEGACY_TORCH_MAGIC = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)[:-1]
# A zip local file header: signature, 22 bytes of fixed fields, file name and extra lengths.
_ZIP_LOCAL_HEADER = struct.Struct("<4s22xHH")


@dataclasses.dataclass(frozen=True)
class _Storage:
  """A torch storage of `dtype` elements; `key=None` stands for a class like FloatStorage."""

  dtype: np.dtype
  key: str | None = None


@dataclasses.dataclass(frozen=True)
class _TensorRecord:
  """A tensor view into a storage record; offset and strides count elements, as in torch."""

  storage: _Storage
  offset: int
  shape: tuple[int, ...]
  stride: tuple[int, ...]


def _rebuild_tensor_v2(
  storage: _Storage, offset: int, size: Sequence[int], stride: Sequence[int], *_: Any
) -> _TensorRecord:
  """Stands in for `torch._utils._rebuild_tensor_v2`; ignores autograd fields and metadata."""
  if not isinstance(storage, _Storage) or storage.key is None:
    raise TypeError(f"tensor storage is {storage!r}")
  index = operator.index
  return _TensorRecord(storage, index(offset), tuple(map(index, size)), tuple(map(index, stride)))


def _rebuild_parameter(data: _TensorRecord, *_: Any) -> _TensorRecord:
  """Stands in for `torch._utils._rebuild_parameter[_with_state]`: keeps just the data."""
  return data


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
  ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
  ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
  ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
  ("collections", "OrderedDict"): collections.OrderedDict,
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Decodes `data.pkl` into dicts of `_TensorRecord`s; refuses all other globals."""

  def __init__(self, data: bytes, path: pathlib.Path):
    super().__init__(io.BytesIO(data), encoding="utf-8")
    self._path = path

  def find_class(self, module: str, name: str) -> Any:
    if module == "torch" and name in _TORCH_STORAGE_DTYPES:
      return _Storage(_TORCH_STORAGE_DTYPES[name])
    if (module, name) not in _ALLOWED_GLOBALS:
      raise TensorFileError(
        f"{self._path}: refusing pickle global {module}.{name}; only (nested) dicts of "
        f"tensors with dtypes {', '.join(map(str, _TORCH_STORAGE_DTYPES.values()))} can be read"
      )
    return _ALLOWED_GLOBALS[module, name]

  def persistent_load(self, pid: Any) -> _Storage:
    # torch writes ('storage', storage_type, key, location, numel).
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
            and isinstance(pid[1], _Storage)):
      raise TensorFileError(f"{self._path}: unsupported persistent id {pid!r}")
    return _Storage(pid[1].dtype, str(pid[2]))


def _flatten(tree: dict, prefix: str, out: dict[str, _TensorRecord], path: pathlib.Path) -> None:
  """Collects the tensors of nested dicts under '.'-joined names; drops other values."""
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      _flatten(value, f"{name}.", out, path)
    elif isinstance(value, _TensorRecord):
      if name in out:
        raise TensorFileError(f"{path}: two tensors are named {name!r} once flattened")
      out[name] = value


def _span(record: _TensorRecord) -> int:
  """Number of storage elements from a view's first element to its last, inclusive."""
  if 0 in record.shape:
    return 0
  return 1 + sum((d - 1) * s for d, s in zip(record.shape, record.stride, strict=True))


class TorchZipReader(FileReader):
  """Reads tensors one at a time from a `torch.save` zip archive, without torch.

  Reads Meta `consolidated.NN.pth` and Hugging Face `pytorch_model*.bin` files: a dict of
  tensors, possibly nested (names are then '.'-joined); other values are ignored. Views
  (transposes, slices, tensors sharing a storage) are read honouring their strides. The
  pickle, the tensor layouts and the zip entries are all checked on opening.
  """

  def _index(self, file_size: int) -> None:
    self._file_size = file_size
    self._zip = self._open_zip()
    self._locations: dict[str, tuple[zipfile.ZipInfo, int]] = {}
    pickles = [n for n in self._zip.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
    if len(pickles) != 1:
      raise TensorFileError(f"{self.path}: expected one <folder>/data.pkl, found {pickles}")
    self._prefix = pickles[0].removesuffix("data.pkl")
    if f"{self._prefix}byteorder" in self._zip.NameToInfo:
      byteorder = self._read_record(f"{self._prefix}byteorder")
      if byteorder.strip() != b"little":
        raise TensorFileError(f"{self.path}: unsupported byte order {byteorder!r}")
    try:
      tree = _RestrictedUnpickler(self._read_record(pickles[0]), self.path).load()
    except TensorFileError:
      raise
    except Exception as e:  # A corrupt pickle can fail in many ways.
      raise TensorFileError(f"{self.path}: cannot decode {pickles[0]}: {e!r}") from e
    if not isinstance(tree, dict):
      raise TensorFileError(f"{self.path}: holds a {type(tree).__name__}, not a dict")
    self._records: dict[str, _TensorRecord] = {}
    _flatten(tree, "", self._records, self.path)
    for name, record in self._records.items():
      where = f"{self.path}: tensor {name!r}"
      layout = (record.offset, *record.shape, *record.stride)
      if len(record.shape) != len(record.stride) or min(layout) < 0:
        raise TensorFileError(f"{where}: invalid layout {record}")
      info, _ = self._locate(self._member(record), where)
      end = (record.offset + _span(record)) * record.storage.dtype.itemsize
      if end > info.file_size:
        raise TensorFileError(f"{where}: needs {end} bytes of {info.filename}; it has fewer")
    self._infos = {
      name: TensorInfo(name, record.shape, record.storage.dtype)
      for name, record in self._records.items()
    }

  def _open_zip(self) -> zipfile.ZipFile:
    try:
      return zipfile.ZipFile(self._file)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
      self._file.seek(0)
      head = self._file.read(len(_LEGACY_TORCH_MAGIC))
      if head == _LEGACY_TORCH_MAGIC:
        problem = "uses the legacy (pre-1.6, non-zip) torch.save format; re-save it with a "
        problem += "modern torch: torch.save(torch.load(path), path)"
      elif head.startswith(b"PK"):
        problem = f"is a truncated or corrupt zip archive ({e})"
      else:
        problem = f"is not a torch.save zip archive ({e})"
      raise TensorFileError(f"{self.path} {problem}") from e

  def _member(self, record: _TensorRecord) -> str:
    return f"{self._prefix}data/{record.storage.key}"

  def _locate(self, member: str, where: str) -> tuple[zipfile.ZipInfo, int]:
    """Returns a member's zip entry and the file offset where its bytes start."""
    if member not in self._locations:
      info = self._zip.NameToInfo.get(member)
      if info is None or info.compress_type != zipfile.ZIP_STORED:
        raise TensorFileError(f"{where}: zip entry {member} is missing or compressed")
      self._file.seek(info.header_offset)
      header = self._file.read(_ZIP_LOCAL_HEADER.size)
      if len(header) < _ZIP_LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
        raise TensorFileError(f"{where}: corrupt zip entry for {member}")
      _, name_size, extra_size = _ZIP_LOCAL_HEADER.unpack(header)
      start = info.header_offset + _ZIP_LOCAL_HEADER.size + name_size + extra_size
      if start + info.file_size > self._file_size:
        raise TensorFileError(f"{where}: zip entry {member} is cut short (truncated file?)")
      self._locations[member] = (info, start)
    return self._locations[member]

  def _read_member(self, member: str, offset: int, out: np.ndarray, where: str) -> None:
    """Fills `out` from byte `offset` of `member`, checking the CRC on whole-member reads."""
    info, start = self._locate(member, where)
    read_into(self._file, start + offset, out, where)
    # With CRCs turned off (torch.serialization.set_crc32_options) torch.save writes 0.
    whole = offset == 0 and out.nbytes == info.file_size
    if whole and info.CRC and zlib.crc32(out.reshape(-1).view(np.uint8)) != info.CRC:
      raise TensorFileError(f"{where}: CRC-32 mismatch in {member}; the file is corrupt")

  def _read_record(self, member: str) -> bytes:
    where = f"{self.path}: {member}"
    out = np.empty(self._locate(member, where)[0].file_size, np.uint8)
    self._read_member(member, 0, out, where)
    return out.tobytes()

  def read(self, name: str) -> np.ndarray:
    info, record = self._info(name), self._records[name]
    where, member = f"{self.path}: tensor {name!r}", self._member(record)
    span = np.empty(_span(record), info.dtype)
    self._read_member(member, record.offset * info.dtype.itemsize, span, where)
    strides = tuple(s * info.dtype.itemsize for s in record.stride)
    tensor = np.lib.stride_tricks.as_strided(span, info.shape, strides)
    return tensor if tensor.flags.c_contiguous else tensor.copy()

  def close(self) -> None:
    self._zip.close()
    super().close()

"""Tests for jbtx.interop.tensor_files: torch-free, tensor-at-a-time checkpoint I/O."""

from __future__ import annotations

import itertools
import pathlib
import pickle
import pickletools
import zipfile

import ml_dtypes
import numpy as np
import pytest

from jbtx.interop import tensor_files as tf
from jbtx.interop.torch_files import TorchZipReader


def _torch():
  return pytest.importorskip("torch")


def _as_numpy(tensor) -> np.ndarray:
  """Exact numpy copy of a torch tensor; bfloat16 goes through its bits."""
  torch = _torch()
  if tensor.dtype == torch.bfloat16:
    return tensor.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return tensor.contiguous().numpy()


def _assert_exact(actual: np.ndarray, expected: np.ndarray) -> None:
  assert actual.dtype == expected.dtype
  assert actual.shape == expected.shape
  assert actual.flags.c_contiguous and actual.flags.writeable
  assert actual.tobytes() == np.ascontiguousarray(expected).tobytes()


_seeds = itertools.count()


def _random(dtype, shape: tuple[int, ...]):
  """A fresh random torch tensor without zeros, so misplaced reads cannot pass."""
  torch = _torch()
  generator = torch.Generator().manual_seed(next(_seeds))
  if dtype == torch.bool:
    return torch.rand(shape, generator=generator) < 0.5
  if dtype.is_floating_point:
    signs = torch.randint(0, 2, shape, generator=generator) * 2 - 1
    return ((torch.rand(shape, generator=generator) + 0.5) * signs).to(dtype)
  return torch.randint(1, 100, shape, generator=generator).to(dtype)


def _read_all(path) -> dict[str, np.ndarray]:
  with tf.open_tensor_file(path) as reader:
    return {name: reader.read(name) for name in reader.infos()}


TORCH_DTYPES = ["float32", "bfloat16", "float16", "int64", "float64", "int32", "int16",
                "int8", "uint8", "bool"]


@pytest.mark.parametrize("dtype_name", TORCH_DTYPES)
def test_torch_roundtrip(tmp_path, dtype_name):
  torch = _torch()
  dtype = getattr(torch, dtype_name)
  tensors = {"matrix": _random(dtype, (5, 7)), "vector": _random(dtype, (11,)),
             "scalar": _random(dtype, ()), "empty": torch.zeros((0, 3), dtype=dtype)}
  torch.save(tensors, tmp_path / "model.pth")
  with tf.open_tensor_file(tmp_path / "model.pth") as reader:
    assert isinstance(reader, TorchZipReader)
    assert list(reader.infos()) == list(tensors)
    for name, tensor in tensors.items():
      info = reader.infos()[name]
      assert info == tf.TensorInfo(name, tuple(tensor.shape), _as_numpy(tensor).dtype)
      _assert_exact(reader.read(name), _as_numpy(tensor))
    first = reader.read("matrix")
    first[...] = first[0, 0]  # Reads return fresh arrays.
    _assert_exact(reader.read("matrix"), _as_numpy(tensors["matrix"]))


def test_torch_non_contiguous_views(tmp_path):
  torch = _torch()
  matrix = _random(torch.float32, (4, 6))
  cube = _random(torch.bfloat16, (2, 3, 4))
  views = {"transposed": matrix.t(), "permuted": cube.permute(2, 0, 1),
           "strided": _random(torch.int64, (5, 8))[1:, ::3]}
  assert not any(v.is_contiguous() for v in views.values())
  torch.save(views, tmp_path / "views.pt")
  actual = _read_all(tmp_path / "views.pt")
  for name, view in views.items():
    _assert_exact(actual[name], _as_numpy(view))


class _CountingFile:
  """Wraps a binary file, counting the bytes read through it."""

  def __init__(self, file):
    self._file, self.bytes_read = file, 0

  def readinto(self, buffer):
    count = self._file.readinto(buffer)
    self.bytes_read += count
    return count

  def read(self, size=-1):
    data = self._file.read(size)
    self.bytes_read += len(data)
    return data

  def __getattr__(self, name):
    return getattr(self._file, name)


def test_reads_touch_only_the_requested_tensor(tmp_path):
  torch = _torch()
  big = {"big": _random(torch.float32, (256, 1024)), "small": _random(torch.float32, (8,))}
  torch.save(big, tmp_path / "big.pth")
  safetensors_torch = pytest.importorskip("safetensors.torch")
  safetensors_torch.save_file(big, str(tmp_path / "big.safetensors"))
  for path in (tmp_path / "big.pth", tmp_path / "big.safetensors"):
    with tf.open_tensor_file(path) as reader:
      reader._file = counting = _CountingFile(reader._file)
      _assert_exact(reader.read("small"), _as_numpy(big["small"]))
      assert counting.bytes_read == 8 * 4


def test_torch_shared_storage(tmp_path):
  torch = _torch()
  base = _random(torch.float16, (40,))
  tensors = {"a": base[3:9], "b": base[10:22].view(3, 4), "c": base[30:38].view(4, 2).t()}
  torch.save(tensors, tmp_path / "shared.bin")
  with zipfile.ZipFile(tmp_path / "shared.bin") as archive:
    assert sum("/data/" in name for name in archive.namelist()) == 1  # One storage record.
  actual = _read_all(tmp_path / "shared.bin")
  for name, tensor in tensors.items():
    _assert_exact(actual[name], _as_numpy(tensor))


def test_torch_nested_state_dict(tmp_path):
  torch = _torch()
  layer = torch.nn.Linear(3, 2).to(torch.bfloat16)
  parameter = torch.nn.Parameter(_random(torch.float32, (2,)))
  parameter.tag = "with state"  # Pickled through _rebuild_parameter_with_state.
  checkpoint = {"model": layer.state_dict(), "extra": {"p": parameter, "note": "text"},
                "step": 3, "lr": 0.5}
  torch.save(checkpoint, tmp_path / "nested.pth")
  actual = _read_all(tmp_path / "nested.pth")
  assert list(actual) == ["model.weight", "model.bias", "extra.p"]
  _assert_exact(actual["model.weight"], _as_numpy(layer.weight.detach()))
  _assert_exact(actual["model.bias"], _as_numpy(layer.bias.detach()))
  _assert_exact(actual["extra.p"], _as_numpy(parameter.detach()))


def test_torch_file_without_crcs(tmp_path):
  torch = _torch()
  tensor = _random(torch.float32, (3, 3))
  torch.serialization.set_crc32_options(False)
  try:
    torch.save({"w": tensor}, tmp_path / "nocrc.pth")
  finally:
    torch.serialization.set_crc32_options(True)
  _assert_exact(_read_all(tmp_path / "nocrc.pth")["w"], _as_numpy(tensor))


def test_torch_corrupt_data_fails_crc(tmp_path):
  torch = _torch()
  tensor = _random(torch.float32, (16,))
  path = tmp_path / "corrupt.pth"
  torch.save({"w": tensor}, path)
  raw = bytearray(path.read_bytes())
  raw[raw.index(_as_numpy(tensor).tobytes()) + 5] ^= 0xFF
  path.write_bytes(bytes(raw))
  with tf.open_tensor_file(path) as reader, pytest.raises(tf.TensorFileError, match="CRC"):
    reader.read("w")


def test_truncated_torch_file(tmp_path):
  torch = _torch()
  path = tmp_path / "consolidated.00.pth"
  torch.save({"w": _random(torch.float32, (64, 64))}, path)
  path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
  with pytest.raises(tf.TensorFileError, match=r"consolidated\.00\.pth.*truncated"):
    tf.open_tensor_file(path)


def test_legacy_torch_file(tmp_path):
  torch = _torch()
  path = tmp_path / "old.pth"
  torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
  with pytest.raises(tf.TensorFileError, match=r"old\.pth.*legacy.*re-save"):
    tf.open_tensor_file(path)


def test_unsupported_torch_dtype(tmp_path):
  torch = _torch()
  torch.save({"w": torch.ones(2, dtype=torch.uint16)}, tmp_path / "u16.pth")
  with pytest.raises(tf.TensorFileError, match=r"u16\.pth.*refusing pickle global"):
    tf.open_tensor_file(tmp_path / "u16.pth")


def _write_zip(path: pathlib.Path, members: dict[str, bytes], compress=zipfile.ZIP_STORED):
  with zipfile.ZipFile(path, "w", compression=compress) as archive:
    for name, data in members.items():
      archive.writestr(name, data)


def _fake_checkpoint(path: pathlib.Path, compress=zipfile.ZIP_STORED, **overrides: bytes):
  """Writes a torch-style zip by hand (no torch); returns the one float32 tensor it holds."""
  values = np.arange(1, 7, dtype=np.float32)
  data_pkl = pickle.PROTO + b"\x02" + (
    b"}X\x01\x00\x00\x00w"  # {"w": _rebuild_tensor_v2(persistent storage, 0, (6,), (1,))}
    b"ctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storagectorch\nFloatStorage\n"
    b"X\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x06tQK\x00K\x06\x85K\x01\x85\x89tRs.")
  members = {"ckpt/data.pkl": data_pkl, "ckpt/byteorder": b"little",
             "ckpt/data/0": values.tobytes(), "ckpt/version": b"3\n"}
  _write_zip(path, {**members, **{f"ckpt/{k}": v for k, v in overrides.items()}}, compress)
  return values


def test_hand_written_checkpoint_without_torch(tmp_path):
  expected = _fake_checkpoint(tmp_path / "fake.pth")
  _assert_exact(_read_all(tmp_path / "fake.pth")["w"], expected)


def test_big_endian_checkpoint_rejected(tmp_path):
  _fake_checkpoint(tmp_path / "big.pth", byteorder=b"big")
  with pytest.raises(tf.TensorFileError, match=r"big\.pth.*byte order"):
    tf.open_tensor_file(tmp_path / "big.pth")


def test_compressed_checkpoint_rejected(tmp_path):
  _fake_checkpoint(tmp_path / "deflated.pth", compress=zipfile.ZIP_DEFLATED)
  with pytest.raises(tf.TensorFileError, match=r"deflated\.pth.*compressed"):
    tf.open_tensor_file(tmp_path / "deflated.pth")


def test_short_storage_record_rejected(tmp_path):
  _fake_checkpoint(tmp_path / "short.pth", **{"data/0": b"\0" * 20})
  with pytest.raises(tf.TensorFileError, match=r"short\.pth.*tensor 'w'"):
    tf.open_tensor_file(tmp_path / "short.pth")


def test_malicious_pickle_is_not_executed(tmp_path):
  marker = tmp_path / "pwned"
  data_pkl = f"(dS'w'\ncos\nsystem\n(S'touch {marker}'\ntRs.".encode()  # {"w": os.system(…)}
  opcodes = [op.name for op, _, _ in pickletools.genops(data_pkl)]  # A well-formed pickle.
  assert opcodes[-3:] == ["REDUCE", "SETITEM", "STOP"]
  _write_zip(tmp_path / "evil.pth", {"archive/data.pkl": data_pkl, "archive/byteorder": b"little"})
  with pytest.raises(tf.TensorFileError, match=r"evil\.pth.*refusing pickle global os\.system"):
    tf.open_tensor_file(tmp_path / "evil.pth")
  assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"garbage " * 100, b"PK\x03\x04 not really"])
def test_garbage_torch_file(tmp_path, content):
  (tmp_path / "garbage.pth").write_bytes(content)
  with pytest.raises(tf.TensorFileError, match=r"garbage\.pth"):
    tf.open_tensor_file(tmp_path / "garbage.pth")


def test_unknown_suffix(tmp_path):
  (tmp_path / "weights.npz").write_bytes(b"whatever")
  with pytest.raises(tf.TensorFileError, match=r"weights\.npz"):
    tf.open_tensor_file(tmp_path / "weights.npz")


def test_reads_safetensors_from_reference_writer(tmp_path):
  torch = _torch()
  safetensors_torch = pytest.importorskip("safetensors.torch")
  tensors = {name: _random(getattr(torch, name), (3, 5)) for name in TORCH_DTYPES}
  tensors["scalar"] = _random(torch.bfloat16, ())
  safetensors_torch.save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
  with tf.open_tensor_file(tmp_path / "ref.safetensors") as reader:
    assert isinstance(reader, tf.SafetensorsReader)
    assert reader.metadata == {"format": "pt"}
    assert set(reader.infos()) == set(tensors)
    for name, tensor in tensors.items():
      _assert_exact(reader.read(name), _as_numpy(tensor))
    with pytest.raises(KeyError, match="missing"):
      reader.read("missing")


def _example_arrays() -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  return {
    "embed": (rng.random((6, 4)) + 0.5).astype(ml_dtypes.bfloat16),
    "norm": (rng.random(4) + 0.5).astype(np.float32),
    "half": (rng.random((2, 3)) - 1.5).astype(np.float16),
    "ids": rng.integers(1, 1000, (5,), dtype=np.int64),
    "mask": np.array([True, False, True]),
    "scalar": np.array(1.25, dtype=ml_dtypes.bfloat16),
    "transposed": (rng.random((3, 5)) + 0.5).astype(np.float32).T,  # Not C-contiguous.
  }


def _infos(arrays: dict[str, np.ndarray]) -> list[tf.TensorInfo]:
  return [tf.TensorInfo(name, a.shape, a.dtype) for name, a in arrays.items()]


def test_write_safetensors_roundtrip(tmp_path):
  arrays = _example_arrays()
  path = tmp_path / "out.safetensors"
  requested = []
  tf.write_safetensors(path, _infos(arrays), lambda n: requested.append(n) or arrays[n],
                       metadata={"format": "pt"})
  assert requested == list(arrays)
  assert not [p for p in tmp_path.iterdir() if p != path]  # No temporary left behind.
  with tf.SafetensorsReader(path) as reader:
    assert reader.metadata == {"format": "pt"}
    assert list(reader.infos()) == list(arrays)
    for name, array in arrays.items():
      _assert_exact(reader.read(name), array)
  safetensors_numpy = pytest.importorskip("safetensors.numpy")
  for name, array in safetensors_numpy.load_file(str(path)).items():
    _assert_exact(array.copy(), arrays[name])  # The loader returns read-only arrays.
  torch = _torch()
  safetensors_torch = pytest.importorskip("safetensors.torch")
  loaded = safetensors_torch.load_file(str(path))
  assert loaded["embed"].dtype == torch.bfloat16
  for name, array in arrays.items():
    _assert_exact(_as_numpy(loaded[name]), array)


def test_write_safetensors_interrupted(tmp_path):
  arrays = _example_arrays()
  path = tmp_path / "out.safetensors"

  def produce(name):
    if name == "ids":
      raise RuntimeError("conversion failed")
    return arrays[name]

  with pytest.raises(RuntimeError, match="conversion failed"):
    tf.write_safetensors(path, _infos(arrays), produce)
  assert list(tmp_path.iterdir()) == []
  path.write_bytes(b"previous")
  with pytest.raises(RuntimeError):
    tf.write_safetensors(path, _infos(arrays), produce)
  assert list(tmp_path.iterdir()) == [path] and path.read_bytes() == b"previous"


def test_write_safetensors_checks_produced_arrays(tmp_path):
  arrays = _example_arrays()
  path = tmp_path / "out.safetensors"
  wrong = {**arrays, "norm": arrays["norm"].astype(np.float64)}
  with pytest.raises(tf.TensorFileError, match=r"out\.safetensors.*'norm'"):
    tf.write_safetensors(path, _infos(arrays), wrong.__getitem__)
  wrong = {**arrays, "ids": arrays["ids"][:4]}
  with pytest.raises(tf.TensorFileError, match=r"out\.safetensors.*'ids'"):
    tf.write_safetensors(path, _infos(arrays), wrong.__getitem__)
  with pytest.raises(tf.TensorFileError, match="unsupported dtype"):
    tf.write_safetensors(path, [tf.TensorInfo("c", (2,), np.dtype(np.complex64))], np.zeros)
  assert list(tmp_path.iterdir()) == []


def test_truncated_safetensors(tmp_path):
  arrays = _example_arrays()
  path = tmp_path / "model-00001.safetensors"
  tf.write_safetensors(path, _infos(arrays), arrays.__getitem__)
  path.write_bytes(path.read_bytes()[:-10])
  with pytest.raises(tf.TensorFileError, match=r"model-00001\.safetensors: tensor 'transposed'"):
    tf.open_tensor_file(path)
  path.write_bytes(path.read_bytes()[:50])  # Now inside the header.
  with pytest.raises(tf.TensorFileError, match=r"model-00001\.safetensors"):
    tf.open_tensor_file(path)


@pytest.mark.parametrize("header", [
  b"not json",
  b"[1, 2]",
  b'{"__metadata__": {"k": 1}}',
  b'{"w": {"dtype": "F32"}}',
  b'{"w": {"dtype": "X9", "shape": [1], "data_offsets": [0, 4]}}',
  b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}',
  b'{"w": {"dtype": "F32", "shape": [-1], "data_offsets": [4, 0]}}',
])
def test_malformed_safetensors_header(tmp_path, header):
  path = tmp_path / "bad.safetensors"
  path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 8)
  with pytest.raises(tf.TensorFileError, match=r"bad\.safetensors"):
    tf.open_tensor_file(path)

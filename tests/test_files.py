"""Atomic writes: the file is whole or as it was."""

import json

import pytest

from jbtx.runtime import files


def test_json_replaces_the_file_whole(tmp_path):
  path = tmp_path / "results.json"
  files.write_json(path, {"rows": [1, 2]})
  files.write_json(path, {"rows": [3]})
  assert json.loads(path.read_text()) == {"rows": [3]}
  assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
  path = tmp_path / "routing.npz"
  path.write_bytes(b"old")

  def fail(f):
    f.write(b"half")
    raise RuntimeError("disk full")

  with pytest.raises(RuntimeError, match="disk full"):
    files.write_atomically(path, fail)
  assert path.read_bytes() == b"old"
  assert [p.name for p in tmp_path.iterdir()] == ["routing.npz"]

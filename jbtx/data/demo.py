"""Built-in demo corpus that every machine has: the interpreter's standard library.

`code` is the Python source of the running interpreter's standard library (test suites
and site-packages excluded), split deterministically by a hash of each file's relative
path, so train and validation never share a file.
"""

from __future__ import annotations

import hashlib
import pathlib
import sysconfig

_EXCLUDED_DIRS = {"site-packages", "test", "tests", "idlelib", "__pycache__", "lib2to3"}


def stdlib_dir() -> pathlib.Path:
  return pathlib.Path(sysconfig.get_paths()["stdlib"])


def _split_of(relative_path: str, validation_fraction: float) -> str:
  digest = int.from_bytes(hashlib.sha256(relative_path.encode()).digest()[:8], "little")
  return "validation" if digest / 2**64 < validation_fraction else "train"


def code_documents(split: str, validation_fraction: float = 0.05) -> list[str]:
  """Texts of the stdlib's `.py` files in `split` ("train" or "validation"), sorted by path.

  Raises:
    ValueError: unknown split, or no files found (a Python without its stdlib sources).
  """
  if split not in ("train", "validation"):
    raise ValueError(f"unknown split {split!r}; expected 'train' or 'validation'")
  root = stdlib_dir()
  docs = []
  for path in sorted(root.rglob("*.py")):
    relative = path.relative_to(root)
    if _EXCLUDED_DIRS & set(relative.parts[:-1]):
      continue
    if _split_of(str(relative), validation_fraction) == split:
      docs.append(path.read_text(encoding="utf-8", errors="replace"))
  if not docs:
    raise ValueError(f"no Python sources for split {split!r} under {root}")
  return docs

"""Demo domain `code`: the Python sources of the running interpreter's standard library.

Test suites, IDLE, lib2to3 and site-packages are left out; each file is one document,
assigned to a split by a hash of its path relative to the stdlib root.
"""

from __future__ import annotations

import pathlib
import sys
import sysconfig

from jbtx.data.demo.splits import split_of

VERSION = "v1-py{}.{}.{}".format(*sys.version_info[:3])
_EXCLUDED_DIRS = {"site-packages", "test", "tests", "idlelib", "__pycache__", "lib2to3"}


def stdlib_dir() -> pathlib.Path:
  return pathlib.Path(sysconfig.get_paths()["stdlib"])


def build() -> tuple[dict[str, list[str]], dict[str, list[dict[str, str]]]]:
  """Documents per split ("train", "validation", "test"), sorted by path; no tasks.

  Raises:
    ValueError: no sources found (a Python installed without its stdlib sources).
  """
  root = stdlib_dir()
  docs: dict[str, list[str]] = {"train": [], "validation": [], "test": []}
  for path in sorted(root.rglob("*.py")):
    relative = path.relative_to(root)
    if _EXCLUDED_DIRS & set(relative.parts[:-1]):
      continue
    docs[split_of(str(relative))].append(path.read_text(encoding="utf-8", errors="replace"))
  if not all(docs.values()):
    raise ValueError(f"too few Python sources under {root} for the demo domain 'code'")
  return docs, {}

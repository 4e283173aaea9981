"""Files written whole or not at all: a reader (or a rerun after kill -9) never sees a
half-written results.json, routing.json, cluster file or stage record."""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Callable
from typing import IO, Any


def write_atomically(path: str | pathlib.Path, write: Callable[[IO[bytes]], None]) -> None:
  """`write(file)` into a temporary file beside `path`, flushed to disk, then renamed
  to `path` (replacing it); on any error the temporary file is removed and `path` is
  left as it was."""
  path = pathlib.Path(path)
  temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  try:
    with open(temporary, "wb") as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(temporary, path)
  except BaseException:
    temporary.unlink(missing_ok=True)
    raise


def write_text(path: str | pathlib.Path, text: str) -> None:
  """`text` (UTF-8) to `path`, atomically."""
  write_atomically(path, lambda f: f.write(text.encode("utf-8")))


def write_json(path: str | pathlib.Path, value: Any, indent: int | None = 2) -> None:
  """`value` as JSON (plus a newline) to `path`, atomically."""
  write_text(path, json.dumps(value, indent=indent, default=str) + "\n")

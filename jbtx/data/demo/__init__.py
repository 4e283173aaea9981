"""Built-in demo domains, made offline and deterministically, cached as JSONL files.

`code` (the interpreter's standard library sources), `math` (generated word problems
with worked solutions), `knowledge` (articles and Q&A about a generated fictional
world) and `general` (the interpreter's documentation topics). Each is built once
into `<data_dir>/demo/<domain>-<version>/` as `{train,validation,test}.jsonl` (one
`{"text": …}` per document) plus `tasks-<split>.jsonl` (`{"prompt", "answer"}`) for
math and knowledge. The directory appears atomically (written under a temporary name,
then renamed), so concurrent builders and interrupted builds are harmless.

`seed/` (`SEED_DIR`) is the demo's seed checkpoint, the `demo` model pretrained on these
domains by `configs/seed.py`; `configs/btx.py` starts from it.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile

from jbtx.data.demo import code, general, knowledge, math
from jbtx.data.demo.splits import SPLITS

_MODULES = {"code": code, "math": math, "knowledge": knowledge, "general": general}
TASK_DOMAINS = ("math", "knowledge")
# The demo's seed checkpoint, made by `python -m jbtx.train --config=configs/seed.py`.
SEED_DIR = pathlib.Path(__file__).parent / "seed"


def data_dir(configured: str = "") -> pathlib.Path:
  """The configured data dir, else `$JBTX_DATA_DIR`, else `~/.cache/jbtx`."""
  path = configured or os.environ.get("JBTX_DATA_DIR") or "~/.cache/jbtx"
  return pathlib.Path(path).expanduser()


def _write_jsonl(path: pathlib.Path, records) -> None:
  with path.open("w", encoding="utf-8") as f:
    for record in records:
      f.write(json.dumps(record, ensure_ascii=False) + "\n")


def build(domain: str, root: pathlib.Path) -> pathlib.Path:
  """The cache directory of `domain` under `root`, built first if absent."""
  if domain not in _MODULES:
    raise ValueError(f"unknown demo domain {domain!r}; expected one of {', '.join(_MODULES)}")
  module = _MODULES[domain]
  target = root / "demo" / f"{domain}-{module.VERSION}"
  if target.is_dir():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  docs, tasks = module.build()
  staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
  try:
    for split in SPLITS:
      _write_jsonl(staging / f"{split}.jsonl", ({"text": d} for d in docs[split]))
      if tasks:
        _write_jsonl(staging / f"tasks-{split}.jsonl", tasks[split])
    try:
      staging.rename(target)
    except OSError:  # Another process finished first; its result is identical.
      if not target.is_dir():
        raise
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return target


def split_file(domain: str, split: str, root: pathlib.Path) -> pathlib.Path:
  """The JSONL file of `split` of demo `domain` (built if needed)."""
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; demo domains have {', '.join(SPLITS)}")
  return build(domain, root) / f"{split}.jsonl"


def tasks(domain: str, split: str, root: pathlib.Path) -> list[dict[str, str]]:
  """Evaluation tasks `{"prompt", "answer"}` of `split` of demo `domain` (math, knowledge).

  The exact answer follows the prompt: for math after the worked solution, as
  `Answer: <integer>`; for knowledge directly after `Answer:`.
  """
  if domain not in TASK_DOMAINS:
    raise ValueError(f"demo domain {domain!r} has no tasks; those with tasks are "
                     f"{', '.join(TASK_DOMAINS)}")
  path = split_file(domain, split, root).with_name(f"tasks-{split}.jsonl")
  with path.open(encoding="utf-8") as f:
    return [json.loads(line) for line in f]

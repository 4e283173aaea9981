"""The task format users extend: one JSONL file per task.

    {"prompt": "Q: 2 + 2 =", "answer": "4"}                          exact match
    {"prompt": "The sky is", "choices": [" blue", " green"], "answer": 0}  multiple choice

Exact-match items are continued greedily and the answer extracted from the output is
compared after `jbtx.eval.tasks.normalize_answer`. Multiple-choice items are scored by
the log-likelihood of each choice after the prompt (`jbtx.inference.likelihood`); a choice
carries its own leading space, as in lm-evaluation-harness. A file holds one kind.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Literal

TaskKind = Literal["exact_match", "multiple_choice"]


class TaskFileError(ValueError):
  """A task file that cannot be read, naming the file and line."""


@dataclasses.dataclass(frozen=True)
class TaskFile:
  """One task: its name (the file's stem), kind and items."""

  name: str
  kind: TaskKind
  items: tuple[dict[str, Any], ...]


def _kind(item: Any, where: str) -> TaskKind:
  if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
    raise TaskFileError(f"{where}: expected an object with a string 'prompt', got {item!r}")
  if "choices" in item:
    choices, answer = item["choices"], item.get("answer")
    if (not isinstance(choices, list) or len(choices) < 2
        or not all(isinstance(c, str) and c for c in choices)):
      raise TaskFileError(f"{where}: 'choices' must list at least two non-empty strings")
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
      raise TaskFileError(f"{where}: 'answer' must be the index of the right choice "
                          f"(0 to {len(choices) - 1}), got {answer!r}")
    return "multiple_choice"
  if not isinstance(item.get("answer"), str):
    raise TaskFileError(f"{where}: an exact-match item needs a string 'answer' (or give "
                        "'choices' for multiple choice)")
  return "exact_match"


def load_task_file(path: str | pathlib.Path, max_examples: int = 0) -> TaskFile:
  """Reads the task at `path` (its first `max_examples` items; 0 = all).

  Raises:
    TaskFileError: if the file is missing, empty, not JSON lines, or mixes kinds.
  """
  path = pathlib.Path(path)
  try:
    lines = path.read_text().splitlines()
  except OSError as e:
    raise TaskFileError(f"task file {path}: {e.strerror}") from None
  items, kinds = [], set()
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    where = f"{path}:{number}"
    try:
      item = json.loads(line)
    except json.JSONDecodeError as e:
      raise TaskFileError(f"{where}: not JSON ({e.msg})") from None
    kinds.add(_kind(item, where))
    items.append(item)
    if len(items) == max_examples:
      break
  if not items:
    raise TaskFileError(f"task file {path} has no items")
  if len(kinds) > 1:
    raise TaskFileError(f"task file {path} mixes exact-match and multiple-choice items; "
                        "put each kind in its own file")
  return TaskFile(path.stem, kinds.pop(), tuple(items))

"""Demo domain `general`: English prose every interpreter ships, its documentation topics.

Each of `pydoc_data.topics.topics` (the language reference sections `help()` shows)
is one document, assigned to a split by a hash of its topic name (15% each held out).
"""

from __future__ import annotations

from pydoc_data.topics import topics

from jbtx.data.demo.splits import split_of

VERSION = "v1"


def build() -> tuple[dict[str, list[str]], dict[str, list[dict[str, str]]]]:
  """Documents per split, in topic-name order; no tasks."""
  docs: dict[str, list[str]] = {"train": [], "validation": [], "test": []}
  for name in sorted(topics):
    docs[split_of(name, held_out=0.15)].append(topics[name].strip())
  return docs, {}

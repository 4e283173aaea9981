"""Evaluation: the task files scored besides the built-in demo tasks."""

from __future__ import annotations

import dataclasses

from jbtx.config.base import require as _require
from jbtx.config.base import require_positive


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """What `python -m jbtx.eval` and the pipeline's eval stage score besides perplexity.

  Attributes:
    tasks: JSONL task files (`jbtx.eval.task_files`), each one task named by its file's
      stem: lines `{"prompt", "answer"}` are exact-match generation tasks, lines
      `{"prompt", "choices", "answer": index}` loglikelihood multiple choice. The
      demo math and knowledge tasks (`btx.task_examples`) are scored as well.
    max_examples: items scored per task file (0 = all).
    max_new_tokens: tokens generated per exact-match item.
    batch_size: prompts (generation) or prompt + choice sequences (multiple choice)
      per batch.
  """

  tasks: tuple[str, ...] = ()
  max_examples: int = 0
  max_new_tokens: int = 64
  batch_size: int = 16

  def __post_init__(self):
    _require(self.max_examples >= 0, "max_examples",
             f"must be non-negative (0 = all), got {self.max_examples}")
    _require(len({t.rsplit("/", 1)[-1] for t in self.tasks}) == len(self.tasks), "tasks",
             f"names each task by its file name, so the names must differ: {self.tasks}")
    require_positive(self, "max_new_tokens", "batch_size")

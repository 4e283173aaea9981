"""Scoring tasks: exact match of generations, and multiple choice by log-likelihood.

    result = exact_match(model, params, tokenizer, tasks, max_new_tokens=64, batch_size=32)
    result["accuracy"]
    multiple_choice(score, tokenizer, items, batch_size=16, max_len=256)["accuracy"]

Each prompt is encoded with BOS (as training documents start), continued greedily
until EOS or `max_new_tokens`, and the answer extracted from the continuation is
compared with the task's answer after `normalize_answer` on both. A multiple-choice item
(`{"prompt", "choices", "answer"}`) is right when its answer is the choice of highest
log-likelihood after the prompt (`jbtx.inference.likelihood`).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import tqdm

from jbtx.data.tokenizers import Tokenizer
from jbtx.inference.generate import generate_ragged
from jbtx.inference.likelihood import Score, encode_pair, pair_log_likelihoods

ANSWER_MARKER = "Answer:"
_PROMPT_MULTIPLE = 32  # prompt lengths are padded up to a multiple of this (few shapes)
_THOUSANDS = re.compile(r"[-+]?\d{1,3}(,\d{3})+(\.\d+)?")
Generate = Callable[..., Any]  # (tokens, lengths, max_new_tokens, eos_id=) -> ids


def normalize_answer(text: str) -> str:
  """The form in which answers are compared.

  Strips the ends, collapses runs of whitespace to one space, drops trailing
  punctuation (`.,;:!?`), removes the commas of a number written with thousands
  separators ("1,000." -> "1000", "-1,234.5" -> "-1234.5") and lowercases.
  """
  text = " ".join(text.split()).rstrip(".,;:!? ")
  if _THOUSANDS.fullmatch(text):
    text = text.replace(",", "")
  return text.lower()


def extract_answer(continuation: str, prompt: str = "") -> str:
  """The model's answer in the text it generated after `prompt`.

  When the prompt ends with "Answer:" (knowledge questions), the answer follows
  directly: the continuation's first line. Otherwise (math prompts end with
  "Solution:" and the worked solution ends in a line "Answer: <int>") it is the
  text after the continuation's first "Answer:" up to the next newline, or the
  continuation's first line when it has no "Answer:".
  """
  if not prompt.rstrip().endswith(ANSWER_MARKER):
    _, marker, after = continuation.partition(ANSWER_MARKER)
    if marker:
      continuation = after
  return continuation.split("\n", 1)[0]


def batch_prompts(tokenizer: Tokenizer, prompts: Sequence[str]
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Right-padded int32 tokens `[batch, max_len]` (BOS first) and lengths `[batch]`.

  `max_len` is the longest prompt rounded up to a multiple of 32.
  """
  encoded = [tokenizer.encode(p, add_bos=True) for p in prompts]
  lengths = np.array([len(e) for e in encoded], np.int32)
  max_len = -(-int(lengths.max()) // _PROMPT_MULTIPLE) * _PROMPT_MULTIPLE
  tokens = np.full((len(encoded), max_len), tokenizer.pad_id, np.int32)
  for row, ids in zip(tokens, encoded, strict=True):
    row[:len(ids)] = ids
  return tokens, lengths


def _continuation(tokenizer: Tokenizer, ids: np.ndarray) -> str:
  """Generated ids `[n]` as text, cut at the first EOS."""
  stops = np.flatnonzero(ids == tokenizer.eos_id)
  return tokenizer.decode(ids[:stops[0]] if stops.size else ids)


def is_correct(task: Mapping[str, str], continuation: str) -> bool:
  """Whether the answer in `continuation` matches the task's, after normalisation."""
  predicted = extract_answer(continuation, task["prompt"])
  return normalize_answer(predicted) == normalize_answer(task["answer"])


def exact_match(model: nn.Module, params: Any, tokenizer: Tokenizer,
                tasks: Sequence[Mapping[str, str]], max_new_tokens: int,
                batch_size: int) -> dict:
  """Greedy exact-match accuracy of `model` on `tasks` (`score_tasks` with
  `generate_ragged`)."""
  return score_tasks(functools.partial(generate_ragged, model, params), tokenizer, tasks,
                     max_new_tokens, batch_size)


def generate_continuations(generate: Generate, tokenizer: Tokenizer, prompts: Sequence[str],
                           max_new_tokens: int, batch_size: int) -> list[str]:
  """Each prompt's greedy continuation as text, cut at the first EOS.

  Each prompt is encoded with BOS; prompts run in batches of `batch_size` (the last one
  filled up with copies, so all batches share a shape).

  Args:
    generate: `(tokens [batch, len], lengths [batch], max_new_tokens, eos_id) -> ids
      [batch, max_new_tokens]`, e.g. `generate_ragged` with its model and parameters.
  """
  batch_size = min(batch_size, len(prompts))
  starts = range(0, len(prompts), batch_size)
  outputs: list[str] = []
  for start in tqdm.tqdm(starts, desc="generate", unit="batch",
                         disable=None if len(starts) > 1 else True):
    batch = list(prompts[start:start + batch_size])
    batch += [batch[-1]] * (batch_size - len(batch))
    tokens, lengths = batch_prompts(tokenizer, batch)
    generated = generate(jnp.asarray(tokens), jnp.asarray(lengths), max_new_tokens,
                         eos_id=int(tokenizer.eos_id))
    outputs += [_continuation(tokenizer, ids) for ids in np.asarray(generated)]
  return outputs[:len(prompts)]


def score_tasks(generate: Generate, tokenizer: Tokenizer, tasks: Sequence[Mapping[str, str]],
                max_new_tokens: int, batch_size: int) -> dict:
  """Exact-match accuracy of the continuations `generate` makes of `tasks`' prompts
  (`generate_continuations`).

  Returns:
    `{"accuracy", "correct", "n", "examples"}`; examples are the first three tasks
    as `{"prompt", "answer", "output"}`, output being the generated continuation.
  """
  if not tasks:
    raise ValueError("exact_match needs at least one task")
  outputs = generate_continuations(generate, tokenizer, [t["prompt"] for t in tasks],
                                   max_new_tokens, batch_size)
  correct = sum(is_correct(task, out) for task, out in zip(tasks, outputs, strict=True))
  examples = [{"prompt": t["prompt"], "answer": t["answer"], "output": out}
              for t, out in zip(tasks[:3], outputs[:3], strict=True)]
  return {"accuracy": correct / len(tasks), "correct": correct, "n": len(tasks),
          "examples": examples}


def multiple_choice(score: Score, tokenizer: Tokenizer, items: Sequence[Mapping[str, Any]],
                    batch_size: int, max_len: int) -> dict[str, Any]:
  """Accuracy of picking the most likely choice of each item (`jbtx.eval.task_files`).

  Returns:
    `{"accuracy", "accuracy_norm", "correct", "n", "log_likelihoods"}`: accuracy_norm
    divides each choice's log-likelihood by its length in characters first (lm-eval's
    acc_norm); log_likelihoods lists each item's per-choice values.
  """
  pairs = [encode_pair(tokenizer, item["prompt"], choice)
           for item in items for choice in item["choices"]]
  scores = iter(pair_log_likelihoods(score, pairs, batch_size, max_len, tokenizer.pad_id,
                                     desc="multiple choice"))
  per_item = [[next(scores)[0] for _ in item["choices"]] for item in items]
  correct = sum(int(np.argmax(values)) == item["answer"]
                for values, item in zip(per_item, items, strict=True))
  correct_norm = sum(
      int(np.argmax([v / len(c) for v, c in zip(values, item["choices"],
                                                          strict=True)])) == item["answer"]
      for values, item in zip(per_item, items, strict=True))
  return {"accuracy": correct / len(items), "accuracy_norm": correct_norm / len(items),
          "correct": correct, "n": len(items), "log_likelihoods": per_item}

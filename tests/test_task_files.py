"""The JSONL task format: both kinds read, bad files named with their line."""

import json

import pytest

from jbtx.eval.task_files import TaskFileError, load_task_file


def _write(path, lines):
  path.write_text("".join((json.dumps(x) if not isinstance(x, str) else x) + "\n"
                          for x in lines))
  return path


def test_both_kinds_are_read_and_named_by_the_file(tmp_path):
  em = load_task_file(_write(tmp_path / "sums.jsonl", [{"prompt": "1+1=", "answer": "2"},
                                                       "", {"prompt": "2+2=", "answer": "4"}]))
  assert (em.name, em.kind, len(em.items)) == ("sums", "exact_match", 2)
  mc = load_task_file(_write(tmp_path / "sky.jsonl", [
      {"prompt": "The sky is", "choices": [" blue", " red"], "answer": 0}] * 3),
      max_examples=2)
  assert (mc.name, mc.kind, len(mc.items)) == ("sky", "multiple_choice", 2)


@pytest.mark.parametrize("line, message", [
    ("{not json", r"sums\.jsonl:1: not JSON"),
    ({"answer": "2"}, "string 'prompt'"),
    ({"prompt": "1+1="}, "needs a string 'answer'"),
    ({"prompt": "x", "choices": [" a"], "answer": 0}, "at least two"),
    ({"prompt": "x", "choices": [" a", " b"], "answer": 2}, "index of the right choice"),
])
def test_bad_items_are_refused_with_file_and_line(tmp_path, line, message):
  with pytest.raises(TaskFileError, match=message):
    load_task_file(_write(tmp_path / "sums.jsonl", [line]))


def test_missing_empty_and_mixed_files_are_refused(tmp_path):
  with pytest.raises(TaskFileError, match=r"nothing\.jsonl"):
    load_task_file(tmp_path / "nothing.jsonl")
  with pytest.raises(TaskFileError, match="has no items"):
    load_task_file(_write(tmp_path / "empty.jsonl", [""]))
  with pytest.raises(TaskFileError, match="mixes"):
    load_task_file(_write(tmp_path / "mixed.jsonl", [
        {"prompt": "1+1=", "answer": "2"}, {"prompt": "x", "choices": [" a", " b"],
                                            "answer": 0}]))

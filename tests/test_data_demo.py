"""Built-in demo domains: offline, deterministic, disjoint splits, no test leakage."""

import json
import socket

import pytest

from jbtx.config import DataConfig, from_mapping
from jbtx.data import demo, loader
from jbtx.data.demo.splits import SPLITS

DOMAINS = ("code", "math", "knowledge", "general")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """All four domains built into a fresh data dir with the network unreachable."""
  root = tmp_path_factory.mktemp("data")
  with pytest.MonkeyPatch.context() as patch:
    def refuse(*args, **kwargs):
      raise AssertionError("the demo data tried to use the network")
    patch.setattr(socket.socket, "connect", refuse)
    patch.setattr(socket, "create_connection", refuse)
    return root, {d: demo.build(d, root) for d in DOMAINS}


def _docs(directory, split) -> list[str]:
  with (directory / f"{split}.jsonl").open(encoding="utf-8") as f:
    return [json.loads(line)["text"] for line in f]


def test_every_domain_has_three_nonempty_disjoint_splits(built):
  _, dirs = built
  for domain, directory in dirs.items():
    docs = {split: _docs(directory, split) for split in SPLITS}
    assert all(docs.values()), domain
    assert not set(docs["train"]) & set(docs["validation"]), domain
    assert not set(docs["train"]) & set(docs["test"]), domain
    assert not set(docs["validation"]) & set(docs["test"]), domain


@pytest.mark.parametrize("domain", ["math", "knowledge"])
def test_held_out_questions_never_appear_in_training_text(built, domain):
  root, dirs = built
  train = "\n".join(_docs(dirs[domain], "train"))
  for split in ("validation", "test"):
    tasks = demo.tasks(domain, split, root)
    assert len(tasks) > 30
    for task in tasks:
      assert task["prompt"] not in train, task
      assert task["answer"].strip() and task["prompt"].rstrip().endswith(":")
  # The training split teaches the same question format.
  assert demo.tasks(domain, "train", root)[0]["prompt"] in train


def test_knowledge_answers_are_stated_in_training_articles(built):
  root, dirs = built
  train = "\n".join(_docs(dirs["knowledge"], "train"))
  tasks = demo.tasks("knowledge", "test", root)
  assert all(t["answer"] in train for t in tasks)


def test_math_solutions_end_in_their_answer(built):
  root, dirs = built
  docs = _docs(dirs["math"], "test")
  for doc, task in zip(docs, demo.tasks("math", "test", root), strict=True):
    assert doc.startswith(task["prompt"]) and doc.endswith(f"Answer: {task['answer']}\n")


def test_builds_are_deterministic(built, tmp_path):
  _, dirs = built
  for domain in ("math", "knowledge", "general"):
    again = demo.build(domain, tmp_path)
    for name in sorted(p.name for p in dirs[domain].iterdir()):
      assert (again / name).read_bytes() == (dirs[domain] / name).read_bytes(), name


def test_default_config_trains_on_the_four_demo_domains(built):
  root, _ = built
  config = from_mapping(DataConfig, {"data_dir": str(root), "seq_len": 64,
                                     "batch_size": 8})
  assert sorted(config.domains) == sorted(DOMAINS)
  batch = next(loader.train_iterator(config, seed=0))
  assert batch["tokens"].shape == (8, 64) and (batch["segment_ids"] > 0).all()
  for domain in DOMAINS:
    first = next(loader.eval_batches(config, "test", domain=domain))
    assert (first["segment_ids"] > 0).any()
  assert loader.eval_tasks(config, "math", "test") == demo.tasks("math", "test", root)
  with pytest.raises(ValueError, match="has no tasks"):
    loader.eval_tasks(config, "code", "test")

"""c-BTM's clusters stage: the training corpus clustered into K domains, one file each.

    workdir/clusters/clusters.json, centroids.npz     the fitted clustering (`TfidfClusters`)
    workdir/clusters/<i>.train.jsonl                  cluster i's training documents
    workdir/clusters/<i>.validation.jsonl             its validation documents
    workdir/clusters/summary.json                     sizes; written last (the stage is done)

The corpus is the finetune mixture's domains (those with a non-zero weight), each
sampled to at most `btm.cluster_documents` training documents (seeded). Training
documents are split by balanced k-means (sizes differ by at most one); validation
documents by the same balanced assignment to the fitted centroids, so that no
cluster's expert is left without validation data. Expert i (`stages.cluster_config`)
then trains on `<i>.train.jsonl` alone.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

from jbtx import files
from jbtx.btx import stages
from jbtx.btx.clusters import balanced_assignment, fit_clusters
from jbtx.config import ExperimentConfig
from jbtx.data import pipeline
from jbtx.training.loop import log

SUMMARY_FILE = "summary.json"


def corpus(config: ExperimentConfig, split: str, sample: int | None) -> list[str]:
  """The finetune mixture's documents of `split`, at most `sample` per domain (seeded)."""
  data = stages.finetune_config(config).data
  rng = np.random.default_rng(config.seed)
  texts = []
  for name, spec in data.domains.items():
    if spec.weight == 0:
      continue
    source = pipeline.open_source(data, name, split)
    count = len(source) if sample is None else min(len(source), sample)
    indices = np.sort(rng.choice(len(source), count, replace=False))
    texts += [source[int(i)] for i in indices]
  return texts


def _write_jsonl(path: pathlib.Path, texts: list[str]) -> None:
  files.write_text(path, "".join(json.dumps({"text": text}, ensure_ascii=False) + "\n"
                                  for text in texts))


def _groups(texts: list[str], assignment: np.ndarray, k: int) -> list[list[str]]:
  return [[t for t, a in zip(texts, assignment, strict=True) if a == i] for i in range(k)]


def write_clusters(config: ExperimentConfig, out: pathlib.Path) -> None:
  """Fits c-BTM's clustering and writes each cluster's documents under `out`."""
  k = config.btm.clusters
  train = corpus(config, "train", config.btm.cluster_documents)
  validation = corpus(config, "validation", None)
  if len(validation) < k:
    raise ValueError(f"config key 'btm.clusters': {k} clusters need at least {k} validation "
                     f"documents, the finetune mixture has {len(validation)}")
  log(f"[clusters] balanced k-means into {k} clusters of {len(train)} training documents "
      f"({config.btm.tfidf_features} tf-idf features)")
  clusters, assignment = fit_clusters(train, k, max_features=config.btm.tfidf_features,
                                      seed=config.seed)
  held_out = balanced_assignment(clusters.squared_distances(validation))
  out.mkdir(parents=True, exist_ok=True)
  groups = _groups(train, assignment, k)
  for i, (documents, held) in enumerate(zip(groups, _groups(validation, held_out, k),
                                            strict=True)):
    _write_jsonl(out / f"{i}.train.jsonl", documents)
    _write_jsonl(out / f"{i}.validation.jsonl", held)
  clusters.save(out)
  summary = {"documents": [len(g) for g in groups],
             "validation_documents": np.bincount(held_out, minlength=k).tolist(),
             "characters": [sum(map(len, g)) for g in groups]}
  files.write_json(out / SUMMARY_FILE, summary, indent=1)
  log(f"[clusters] documents per cluster {summary['documents']}, characters "
      f"{summary['characters']}")

"""c-BTM's clusters: the training corpus clustered into K domains, one file each, and
the clustering saved for inference (`jbtx.pipeline.stages.btm` runs and reads them).

    workdir/clusters/clusters.json, centroids.npz     the fitted clustering (`save_clusters`)
    workdir/clusters/<i>.train.jsonl                  cluster i's training documents
    workdir/clusters/<i>.validation.jsonl             its validation documents
    workdir/clusters/summary.json                     sizes; written last (the stage is done)

The corpus is the finetune mixture's domains (those with a non-zero weight), each
sampled to at most `btm.cluster_documents` training documents (seeded). Training
documents are split by balanced k-means (sizes differ by at most one); validation
documents by the same balanced assignment to the fitted centroids, so that no
cluster's expert is left without validation data. Expert i (`cluster_config`) then
trains on `<i>.train.jsonl` alone. The clustering is stored as clusters.json
(vocabulary, settings) and centroids.npz (idf, centroids), each written atomically; no
pickle.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import zipfile

import numpy as np

from jbtx.config import ExperimentConfig
from jbtx.config.data import DomainConfig
from jbtx.data import loader
from jbtx.methods.clusters import SETTINGS, TfidfClusters, balanced_assignment, fit_clusters
from jbtx.pipeline import budgets, experiments
from jbtx.runtime import files
from jbtx.runtime.distributed import log

SUMMARY_FILE = "summary.json"
CONFIG_FILE, ARRAYS_FILE = "clusters.json", "centroids.npz"
FORMAT = "jbtx.btx.clusters/1"


def corpus(config: ExperimentConfig, split: str, sample: int | None) -> list[str]:
  """The finetune mixture's documents of `split`, at most `sample` per domain (seeded)."""
  data = experiments.finetune_config(config).data
  rng = np.random.default_rng(config.seed)
  texts = []
  for name, spec in data.domains.items():
    if spec.weight == 0:
      continue
    source = loader.open_source(data, name, split)
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
  save_clusters(clusters, out)
  summary = {"documents": [len(g) for g in groups],
             "validation_documents": np.bincount(held_out, minlength=k).tolist(),
             "characters": [sum(map(len, g)) for g in groups]}
  files.write_json(out / SUMMARY_FILE, summary, indent=1)
  log(f"[clusters] documents per cluster {summary['documents']}, characters "
      f"{summary['characters']}")


def cluster_config(config: ExperimentConfig, index: int,
                   corpus_dir: pathlib.Path) -> ExperimentConfig:
  """c-BTM's expert `index`: the seed trained on its cluster's documents (files in
  `corpus_dir`, written by `write_clusters`) with the finetune's schedule; the K experts
  together get BTX's training FLOPs (their steps differ by at most one)."""
  k = config.btm.clusters
  total = budgets.matched_steps(config, config.model)
  steps = max(1, total // k + (index < total % k))
  name = f"cluster{index}"
  domain = DomainConfig(source="files", splits={
      split: str(corpus_dir / f"{index}.{split}.jsonl") for split in ("train", "validation")})
  stage = dataclasses.replace(config.btx.finetune, steps=steps)
  derived = experiments.with_training(config, stage)
  return experiments.freezing_only_moe(
      dataclasses.replace(derived, data=config.data.single_domain(name, domain)))


def save_clusters(clusters: TfidfClusters, directory: str | os.PathLike) -> None:
  """Writes clusters.json and centroids.npz under `directory`, each atomically."""
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  config = {"format": FORMAT, "settings": SETTINGS, "clusters": len(clusters.centroids),
            "features": len(clusters.vocabulary), "vocabulary": clusters.vocabulary}
  arrays = {"idf": np.asarray(clusters.idf), "centroids": np.asarray(clusters.centroids)}
  files.write_atomically(directory / ARRAYS_FILE, lambda f: np.savez(f, **arrays))
  files.write_json(directory / CONFIG_FILE, config, indent=None)


def load_clusters(directory: str | os.PathLike) -> TfidfClusters:
  """Reads what `save_clusters` wrote; FileNotFoundError / ValueError naming a missing
  or bad file."""
  directory = pathlib.Path(directory)
  config_path, arrays_path = directory / CONFIG_FILE, directory / ARRAYS_FILE
  for path in (config_path, arrays_path):
    if not path.is_file():
      raise FileNotFoundError(f"{path}: missing; not a saved c-BTM clustering")
  try:
    config = json.loads(config_path.read_text())
    vocabulary = {str(term): int(index) for term, index in config["vocabulary"].items()}
    if config.get("format") != FORMAT or config.get("settings") != SETTINGS:
      raise ValueError(f"format/settings {config.get('format')}, {config.get('settings')}")
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    raise ValueError(f"{config_path}: damaged or not a c-BTM clustering ({e})") from e
  try:
    with np.load(arrays_path, allow_pickle=False) as arrays:
      idf, centroids = arrays["idf"], arrays["centroids"].astype(np.float32)
  except (ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile) as e:
    raise ValueError(f"{arrays_path}: damaged ({type(e).__name__}: {e})") from e
  features = len(vocabulary)
  if (sorted(vocabulary.values()) != list(range(features)) or idf.shape != (features,)
      or centroids.ndim != 2 or centroids.shape != (config.get("clusters"), features)):
    raise ValueError(f"{arrays_path}: idf {idf.shape} / centroids {centroids.shape} do not "
                     f"match {config_path} ({config.get('clusters')} clusters, "
                     f"{features} terms)")
  return TfidfClusters(vocabulary, idf, centroids)

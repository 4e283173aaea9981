"""c-BTM's clustering (Gururangan et al. 2023): unsupervised domains for expert training.

    fit:    texts -> tf-idf features X [n, F] (sublinear tf, l2-normalised rows)
                  -> balanced k-means: K centroids C [K, F], each text in one cluster,
                     cluster sizes differing by at most one (one expert per cluster)
    infer:  context -> x [F] -> d²_j = ||x - c_j||² [K] -> weights softmax(-d²/T) [K]
            (T = 0.1; a top-k renormalisation of the weights is done by the caller)

Validation documents (no balance needed) go to their nearest centroid (`nearest`).
The c-BTM stages save and load a fitted clustering (`jbtx.pipeline.clusters`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import scipy.sparse
from sklearn.feature_extraction.text import CountVectorizer, TfidfVectorizer
from sklearn.preprocessing import normalize

CONFIG_FILE, ARRAYS_FILE = "clusters.json", "centroids.npz"
FORMAT = "jbtx.methods.clusters/1"
SETTINGS = {"sublinear_tf": True, "norm": "l2", "lowercase": True}  # what `features` computes


@dataclasses.dataclass(frozen=True)
class TfidfClusters:
  """A fitted c-BTM clustering: the tf-idf vocabulary and idf, and K centroids."""

  vocabulary: dict[str, int]  # term -> feature index
  idf: np.ndarray  # float [features]
  centroids: np.ndarray  # float32 [clusters, features] (dense)

  def features(self, texts: Sequence[str]) -> scipy.sparse.csr_matrix:
    """[n, features] l2-normalised tf-idf, as the fitted TfidfVectorizer gives it."""
    counts = CountVectorizer(vocabulary=self.vocabulary).transform(texts).astype(np.float64)
    np.log(counts.data, out=counts.data)
    counts.data += 1.0  # sublinear tf: 1 + log(tf)
    counts.data *= self.idf[counts.indices]
    return normalize(counts, norm="l2", copy=False).tocsr()

  def squared_distances(self, texts: Sequence[str]) -> np.ndarray:
    """float32 [n, clusters]: ||x - c||² (an empty text, x = 0, gives ||c||²)."""
    return _squared_distances(self.features(texts), self.centroids)

  def nearest(self, texts: Sequence[str]) -> np.ndarray:
    """int [n]: each text's nearest centroid (unbalanced)."""
    return np.argmin(self.squared_distances(texts), axis=1)


def fit_clusters(texts: Sequence[str], n_clusters: int, *, max_features: int = 4096,
                 seed: int = 0, iterations: int = 20) -> tuple[TfidfClusters, np.ndarray]:
  """tf-idf fitted on `texts`, then balanced k-means; returns the clustering and each
  text's cluster (int [n]), cluster sizes differing by at most one."""
  _check_sizes(len(texts), n_clusters)
  vectorizer = TfidfVectorizer(sublinear_tf=True, max_features=max_features)
  try:
    features = vectorizer.fit_transform(texts)
  except ValueError as e:  # sklearn: "empty vocabulary; perhaps ... only contain stop words"
    raise ValueError(f"tf-idf found no terms in the {len(texts)} texts ({e})") from e
  centroids, assignment = balanced_kmeans(features, n_clusters, seed=seed,
                                          iterations=iterations)
  vocabulary = {str(term): int(index) for term, index in vectorizer.vocabulary_.items()}
  return TfidfClusters(vocabulary, vectorizer.idf_.copy(), centroids), assignment


def _check_sizes(n: int, n_clusters: int) -> None:
  if n_clusters < 2:
    raise ValueError(f"n_clusters must be at least 2, got {n_clusters}")
  if n < n_clusters:
    raise ValueError(f"{n} texts are fewer than the {n_clusters} clusters")


def _squared_distances(features, centroids: np.ndarray) -> np.ndarray:
  """[n, F] (dense or sparse) x [k, F] -> float32 [n, k] ||x - c||², computed in float64."""
  centroids = np.asarray(centroids, np.float64)
  if scipy.sparse.issparse(features):
    rows = np.asarray(features.multiply(features).sum(axis=1)).reshape(-1, 1)
  else:
    features = np.asarray(features, np.float64)
    rows = np.einsum("nf,nf->n", features, features)[:, None]
  cross = np.asarray(features @ centroids.T)
  squared = rows - 2.0 * cross + np.einsum("kf,kf->k", centroids, centroids)[None, :]
  return np.maximum(squared, 0.0).astype(np.float32)


def _initial_centroids(features, n_clusters: int, rng: np.random.Generator) -> np.ndarray:
  """k-means++: distinct rows, each drawn with probability ∝ d² to the nearest chosen."""
  n = features.shape[0]
  chosen, nearest = [int(rng.integers(n))], np.full(n, np.inf)
  for _ in range(1, n_clusters):
    d = _squared_distances(features, _dense(features[chosen[-1:]]))[:, 0]
    nearest = np.minimum(nearest, d.astype(np.float64))
    nearest[chosen] = 0.0
    if not nearest.sum() > 0:  # all rows equal a chosen one: any other row
      nearest = np.ones(n)
      nearest[chosen] = 0.0
    chosen.append(int(rng.choice(n, p=nearest / nearest.sum())))
  return _dense(features[chosen])


def _dense(x) -> np.ndarray:
  """float64 [n, F] from a dense or sparse matrix."""
  return x.toarray() if scipy.sparse.issparse(x) else np.asarray(x, np.float64)


def _means(features, assignment: np.ndarray, n_clusters: int) -> np.ndarray:
  """float64 [k, F]: the mean of each cluster's rows (every cluster is non-empty)."""
  sizes = np.bincount(assignment, minlength=n_clusters)
  n = len(assignment)
  average = scipy.sparse.csr_matrix((1.0 / sizes[assignment], (assignment, np.arange(n))),
                                    shape=(n_clusters, n))
  return _dense(average @ features)


def balanced_kmeans(features, n_clusters: int, *, seed: int = 0,
                    iterations: int = 20) -> tuple[np.ndarray, np.ndarray]:
  """Lloyd's k-means on `features` [n, F] (dense or sparse) with `balanced_assignment`.

  k-means++ initialisation from `np.random.default_rng(seed)` (deterministic); stops
  early when the assignment does not change. Returns (centroids float32 [k, F] — the
  means of the returned clusters — and the assignment int [n]).
  """
  _check_sizes(features.shape[0], n_clusters)
  if iterations < 1:
    raise ValueError(f"iterations must be at least 1, got {iterations}")
  if not scipy.sparse.issparse(features):
    features = np.asarray(features, np.float64)
  centroids = _initial_centroids(features, n_clusters, np.random.default_rng(seed))
  assignment = None
  for _ in range(iterations):
    new = balanced_assignment(_squared_distances(features, centroids))
    if assignment is not None and np.array_equal(new, assignment):
      break
    assignment, centroids = new, _means(features, new, n_clusters)
  return centroids.astype(np.float32), assignment


def balanced_assignment(squared_distances: np.ndarray) -> np.ndarray:
  """[n, k] -> int [n]: one cluster per row, sizes floor(n/k) or ceil(n/k).

  Greedy, by increasing distance over all (row, cluster) pairs (ties by row, then
  cluster): a pair is taken when its row is free and its cluster is not full, where a
  cluster is full at ceil(n/k) rows, or at floor(n/k) once n % k clusters have ceil(n/k).
  This is the common approximation of the balanced linear assignment c-BTM solves.
  Vectorised by phases: while the set of open clusters is fixed, each free row is taken
  at its nearest open cluster, so rows are ordered by that distance up to the first
  moment a cluster fills (at most 2k phases of O(nk)).
  """
  d = np.asarray(squared_distances)
  n, k = d.shape
  floor, extras = divmod(n, k)
  assignment, counts = np.full(n, -1, np.int64), np.zeros(k, np.int64)
  free = np.arange(n)
  while len(free):
    spare = extras - np.count_nonzero(counts > floor)  # clusters that may still reach ceil
    capacity = floor + (spare > 0)
    open_ = np.flatnonzero(counts < capacity)
    sub = d[free][:, open_]
    best = np.argmin(sub, axis=1)
    order = np.lexsort((free, sub[np.arange(len(free)), best]))
    clusters = open_[best[order]]
    stop = len(order)  # pairs taken in this phase: up to the first cluster to fill
    for j in open_:
      members = np.flatnonzero(clusters == j)
      if len(members) >= capacity - counts[j]:
        stop = min(stop, members[capacity - counts[j] - 1] + 1)
    assignment[free[order[:stop]]] = clusters[:stop]
    counts += np.bincount(clusters[:stop], minlength=k)
    free = np.sort(free[order[stop:]])
  return assignment


def cluster_weights(squared_distances: np.ndarray, temperature: float = 0.1) -> np.ndarray:
  """[..., k] -> [..., k] softmax(-d²/T) over the last axis; rows sum to 1."""
  if not temperature > 0:
    raise ValueError(f"temperature must be positive, got {temperature}")
  d = np.asarray(squared_distances)
  logits = -d.astype(np.float64) / temperature
  logits -= logits.max(axis=-1, keepdims=True)
  weights = np.exp(logits)
  weights /= weights.sum(axis=-1, keepdims=True)
  return weights.astype(np.result_type(d.dtype, np.float32))

"""c-BTM clustering (`jbtx.methods.clusters`): tf-idf, balanced k-means, cluster weights.

Tolerances: features 1e-6 (the same float64 tf-idf as sklearn's, in another order);
squared distances 1e-5 (float32 results of float64 computations on unit vectors).
"""

from __future__ import annotations

import random
import time

import numpy as np
import pytest
from sklearn.feature_extraction.text import TfidfVectorizer

from jbtx.methods import clusters
from jbtx.methods.clusters import (
  balanced_assignment,
  balanced_kmeans,
  cluster_weights,
  fit_clusters,
)
from jbtx.pipeline.clusters import load_clusters, save_clusters

VOCABULARIES = [[f"{prefix}{i}" for i in range(12)] for prefix in ("alpha", "beta", "gamma")]


def synthetic_texts(per_domain: int = 30, seed: int = 0) -> tuple[list[str], np.ndarray]:
  """`per_domain` texts from each of 3 disjoint vocabularies, shuffled; (texts, domain)."""
  rng = random.Random(seed)
  items = [(" ".join(rng.choices(words, k=rng.randint(5, 15))), domain)
           for domain, words in enumerate(VOCABULARIES) for _ in range(per_domain)]
  rng.shuffle(items)
  return [text for text, _ in items], np.array([domain for _, domain in items])


def greedy_reference(d: np.ndarray) -> np.ndarray:
  """The documented greedy, pair by pair in increasing distance (ties by row, cluster)."""
  n, k = d.shape
  floor, extras = divmod(n, k)
  assignment, counts = np.full(n, -1), np.zeros(k, int)
  for flat in np.argsort(d, axis=None, kind="stable"):
    row, j = divmod(int(flat), k)
    if assignment[row] >= 0:
      continue
    if counts[j] < floor or (counts[j] == floor and extras > 0):
      extras -= counts[j] == floor
      assignment[row], counts[j] = j, counts[j] + 1
  return assignment


@pytest.mark.parametrize("n,k", [(12, 3), (13, 3), (100, 7), (5, 8), (41, 2), (64, 8)])
def test_balanced_assignment_sizes_and_greedy(n, k):
  rng = np.random.default_rng(n * 100 + k)
  d = rng.random((n, k)) * rng.random((1, k)) * 3  # uneven clusters: argmin is unbalanced
  assignment = balanced_assignment(d)
  sizes = np.bincount(assignment, minlength=k)
  assert sizes.sum() == n and sizes.max() - sizes.min() <= 1
  np.testing.assert_array_equal(assignment, greedy_reference(d))
  ties = np.round(d, 1)  # many equal distances
  np.testing.assert_array_equal(balanced_assignment(ties), greedy_reference(ties))


def test_balanced_assignment_is_argmin_when_argmin_is_balanced():
  rng = np.random.default_rng(1)
  nearest = rng.permutation(np.arange(30) % 5)  # 6 rows per cluster
  d = rng.random((30, 5)) + 1.0
  d[np.arange(30), nearest] = rng.random(30) * 0.5
  np.testing.assert_array_equal(balanced_assignment(d), nearest)


def test_balanced_assignment_is_fast():
  d = np.random.default_rng(2).random((20000, 8)).astype(np.float32)
  d[:, 3] -= 0.5  # most rows prefer cluster 3
  start = time.perf_counter()
  sizes = np.bincount(balanced_assignment(d), minlength=8)
  assert time.perf_counter() - start < 0.5
  assert set(sizes) == {2500}


def test_fit_clusters_finds_the_vocabularies():
  texts, domains = synthetic_texts()
  fitted, assignment = fit_clusters(texts, 3, seed=0)
  assert np.bincount(assignment).tolist() == [30, 30, 30]
  for j in range(3):
    assert len(set(domains[assignment == j])) == 1  # every cluster pure
  np.testing.assert_array_equal(fitted.nearest(texts), assignment)
  again, assignment_again = fit_clusters(texts, 3, seed=0)
  np.testing.assert_array_equal(assignment_again, assignment)
  np.testing.assert_array_equal(again.centroids, fitted.centroids)
  assert fitted.centroids.dtype == np.float32 and fitted.centroids.shape == (3, 36)


def test_balanced_kmeans_dense_and_sparse_agree():
  texts, _ = synthetic_texts(per_domain=10, seed=3)
  features = TfidfVectorizer(sublinear_tf=True).fit_transform(texts)
  sparse = balanced_kmeans(features, 4, seed=5)
  dense = balanced_kmeans(features.toarray(), 4, seed=5)
  np.testing.assert_array_equal(sparse[1], dense[1])
  np.testing.assert_allclose(sparse[0], dense[0], atol=1e-6)
  assert np.ptp(np.bincount(sparse[1], minlength=4)) <= 1


def test_features_and_distances_match_sklearn_and_numpy():
  texts, _ = synthetic_texts(seed=4)
  fitted, _ = fit_clusters(texts, 3, max_features=20)
  queries = [*texts[:10], "", "ALPHA1 alpha1 beta2 unknown-word"]
  expected = TfidfVectorizer(sublinear_tf=True, max_features=20).fit(texts).transform(queries)
  features = fitted.features(queries)
  assert features.shape == (12, 20)
  np.testing.assert_allclose(features.toarray(), expected.toarray(), atol=1e-6)
  x, c = expected.toarray(), fitted.centroids.astype(np.float64)
  direct = ((x[:, None, :] - c[None, :, :]) ** 2).sum(-1)
  distances = fitted.squared_distances(queries)
  assert distances.dtype == np.float32
  np.testing.assert_allclose(distances, direct, atol=1e-5)
  np.testing.assert_allclose(distances[10], (c**2).sum(-1), atol=1e-6)  # the empty text


def test_cluster_weights():
  rng = np.random.default_rng(6)
  d = rng.random((50, 4)).astype(np.float32) * 2
  weights = cluster_weights(d, 0.1)
  np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-6)
  logits = -d.astype(np.float64) / 0.1
  expected = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  np.testing.assert_allclose(weights, expected, rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(np.argmax(weights, -1), np.argmin(d, -1))
  sharper, softer = cluster_weights(d, 0.09).max(-1), cluster_weights(d, 0.11).max(-1)
  assert np.all(sharper >= weights.max(-1)) and np.all(weights.max(-1) >= softer)
  assert np.all(sharper > softer)
  far = cluster_weights(np.array([[1e4, 1e4 + 1.0]]), 0.1)  # no overflow: max subtracted
  np.testing.assert_allclose(far, [[1 / (1 + np.exp(-10)), 1 - 1 / (1 + np.exp(-10))]])
  with pytest.raises(ValueError, match="temperature"):
    cluster_weights(d, 0.0)
  with pytest.raises(ValueError, match="temperature"):
    cluster_weights(d, -1.0)


def test_save_load_round_trip_and_damage(tmp_path):
  texts, _ = synthetic_texts(per_domain=10)
  fitted, _ = fit_clusters(texts, 3)
  save_clusters(fitted, tmp_path / "clusters")
  loaded = load_clusters(tmp_path / "clusters")
  assert loaded.vocabulary == fitted.vocabulary
  np.testing.assert_array_equal(loaded.squared_distances(texts), fitted.squared_distances(texts))
  names = sorted(p.name for p in (tmp_path / "clusters").iterdir())
  assert names == [clusters.ARRAYS_FILE, clusters.CONFIG_FILE]  # no temporary files left
  arrays = tmp_path / "clusters" / clusters.ARRAYS_FILE
  arrays.write_bytes(arrays.read_bytes()[:100])
  with pytest.raises(ValueError, match=r"centroids\.npz"):
    load_clusters(tmp_path / "clusters")
  (tmp_path / "clusters" / clusters.CONFIG_FILE).unlink()
  with pytest.raises(FileNotFoundError, match=r"clusters\.json"):
    load_clusters(tmp_path / "clusters")
  (tmp_path / "bad").mkdir()
  save_clusters(fitted, tmp_path / "bad")
  (tmp_path / "bad" / clusters.CONFIG_FILE).write_text('{"vocabulary": ')
  with pytest.raises(ValueError, match=r"clusters\.json"):
    load_clusters(tmp_path / "bad")


def test_errors():
  texts, _ = synthetic_texts(per_domain=2)
  with pytest.raises(ValueError, match="at least 2"):
    fit_clusters(texts, 1)
  with pytest.raises(ValueError, match="fewer than"):
    fit_clusters(texts[:3], 4)
  with pytest.raises(ValueError, match="no terms"):
    fit_clusters(["", " ", "!?"], 2)
  with pytest.raises(ValueError, match="fewer than"):
    balanced_kmeans(np.eye(3), 4)

"""Branch-Train-Merge: the experts kept apart, ensembled at inference or averaged."""

from __future__ import annotations

import dataclasses

from jbtx.config.base import require as _require
from jbtx.config.base import require_positive


@dataclasses.dataclass(frozen=True)
class BTMConfig:
  """The BTM baseline (`btx.baselines` lists "btm"), on BTX's experts or on c-BTM's.

  Ensemble: `p(x_t | x_<t) = Σ_j p(x_t | x_<t, D=j) · w_j(x_<t)`, with the weights the
  top-k of the domain posterior (BTM) or of the cluster weights (c-BTM), renormalised.
  BTM's posterior is Bayes' rule over a running prior: uniform at the start of each
  document, multiplied by each expert's likelihood of the document's tokens so far,
  then smoothed towards uniform, `w ← (1 − smoothing) · w + smoothing / N`, so that no
  expert's weight reaches 0 for good. Averaging: one dense model whose parameters are
  the experts' mean, uniform and weighted by the posterior.

  Attributes:
    top_k: the ensembles evaluated, by number of experts kept (0 = all).
    smoothing: the posterior's mix with uniform, in [0, 1).
    average_batches: test-split batches per domain whose mean posterior weighs that
      domain's averaged model (the test split is read by nothing else).
    clusters: 0 = BTM on BTX's domain experts; K ≥ 2 = c-BTM: the finetune mixture's
      training documents clustered by balanced k-means on tf-idf into K domains, one
      expert per cluster trained from the seed (together BTX's training FLOPs), each
      context weighted by softmax(−d²/T) over its distance to the centroids.
    temperature: T of c-BTM's cluster weights.
    cluster_documents: training documents per domain sampled to fit the clusters.
    tfidf_features: vocabulary size of the tf-idf features.
    context_stride: c-BTM recomputes a context's cluster weights every this many
      tokens of a document (its first tokens, with no context yet, weigh all clusters
      equally); generation uses the prompt's weights throughout.
  """

  top_k: tuple[int, ...] = (1, 2)
  smoothing: float = 0.01
  average_batches: int = 2
  clusters: int = 0
  temperature: float = 0.1
  cluster_documents: int = 2000
  tfidf_features: int = 4096
  context_stride: int = 32

  def __post_init__(self):
    _require(bool(self.top_k) and all(k >= 0 for k in self.top_k), "top_k",
             f"must list non-negative expert counts (0 = all), got {self.top_k}")
    _require(0 <= self.smoothing < 1, "smoothing", f"must be in [0, 1), got {self.smoothing}")
    _require(self.average_batches > 0, "average_batches",
             f"must be positive, got {self.average_batches}")
    _require(self.clusters == 0 or self.clusters >= 2, "clusters",
             f"must be 0 (BTM) or at least 2 (c-BTM), got {self.clusters}")
    _require(self.temperature > 0, "temperature", f"must be positive, got {self.temperature}")
    require_positive(self, "cluster_documents", "tfidf_features", "context_stride")

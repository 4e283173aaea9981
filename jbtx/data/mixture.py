"""Domain mixtures and shuffling: which domain and which document each row gets.

Both are pure functions of (seed, counters), so a pipeline's state is just its
counters. Row `lane` of step `step` draws its domain from a uniform number that only
depends on (seed, step, lane); document slots of a domain map to documents through a
fresh permutation per epoch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_MIX_STREAM = 0x6D6978  # Separates the mixture's random stream from the shuffles'.


def normalize(weights: Sequence[float]) -> np.ndarray:
  """Non-negative weights -> probabilities `[n_domains]`."""
  w = np.asarray(weights, np.float64)
  if (w < 0).any() or w.sum() <= 0:
    raise ValueError(f"domain weights must be non-negative with a positive sum, got {w}")
  return w / w.sum()


def choose_domains(probabilities: np.ndarray, seed: int, step: int,
                   batch_size: int) -> np.ndarray:
  """The domain index of every row of global batch `step`, int `[batch_size]`."""
  uniform = np.random.default_rng([seed, _MIX_STREAM, step]).random(batch_size)
  cumulative = np.cumsum(probabilities)
  return np.minimum(np.searchsorted(cumulative / cumulative[-1], uniform, side="right"),
                    len(probabilities) - 1)


def reweight(weights: Sequence[float], losses: Sequence[float],
             reference: Sequence[float], eta: float, smoothing: float) -> np.ndarray:
  """Dynamic data mixing (Sheared-LLaMA, LLaMA-MoE): domains behind their reference gain.

  `w <- softmax(log w + eta * (L - L_ref))`, then `w <- (1 - c) w + c / n`.

  Returns:
    The new probabilities `[n_domains]`.
  """
  w = normalize(weights)
  logits = np.log(np.maximum(w, 1e-30)) + eta * (np.asarray(losses) - np.asarray(reference))
  new = np.exp(logits - logits.max())
  new /= new.sum()
  return (1 - smoothing) * new + smoothing / len(new)


class ShuffledOrder:
  """Document slot -> document index: epoch `slot // n` is a fresh permutation of n docs.

  The most recently used permutations are cached (at least 4, up to ~2^22 indices in
  all), since the lanes of a small domain are spread over many epochs; any slot is
  recomputable from (seed, stream, slot) alone.
  """

  def __init__(self, n: int, seed: int, stream: int):
    self.n = n
    self._seed = seed
    self._stream = stream
    self._cache: dict[int, np.ndarray] = {}
    self._cache_size = max(4, 2**22 // n)

  def _permutation(self, epoch: int) -> np.ndarray:
    permutation = self._cache.pop(epoch, None)
    if permutation is None:
      if len(self._cache) >= self._cache_size:
        del self._cache[next(iter(self._cache))]  # The least recently used.
      permutation = np.random.default_rng([self._seed, self._stream, epoch]).permutation(
          self.n)
    self._cache[epoch] = permutation
    return permutation

  def __getitem__(self, slot: int) -> int:
    epoch, index = divmod(slot, self.n)
    return int(self._permutation(epoch)[index])


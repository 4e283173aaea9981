"""Domain mixtures and shuffling: which domain and which document each row gets.

Both are pure functions of (seed, counters), so a pipeline's state is just its
counters. Row `lane` of step `step` draws its domain from a uniform number that only
depends on (seed, step, lane); document slots of a domain map to documents through a
fresh permutation per epoch.
"""

from __future__ import annotations

import functools
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


_M64 = (1 << 64) - 1
_ROUNDS = 6


def _mix(x: int) -> int:
  """SplitMix64's finaliser: a 64-bit integer hash."""
  x = (x + 0x9E3779B97F4A7C15) & _M64
  x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
  x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
  return x ^ (x >> 31)


@functools.lru_cache(maxsize=256)
def _round_keys(base: int, epoch: int) -> tuple[int, ...]:
  return tuple(_mix(base ^ _mix(epoch * _ROUNDS + r)) for r in range(_ROUNDS))


class ShuffledOrder:
  """Document slot -> document index: epoch `slot // n` is a fresh permutation of n docs.

  The permutation is a keyed Feistel network on the smallest even number of bits
  that covers n, with cycle walking down to [0, n): any slot maps in O(1) time and
  memory from (seed, stream, slot) alone, however large the dataset.
  """

  def __init__(self, n: int, seed: int, stream: int):
    self.n = n
    self._half = max(1, (max(n - 1, 1).bit_length() + 1) // 2)
    self._base = _mix(_mix(seed & _M64) ^ stream)

  def __getitem__(self, slot: int) -> int:
    epoch, x = divmod(slot, self.n)
    keys = _round_keys(self._base, epoch)
    mask = (1 << self._half) - 1
    while True:
      left, right = x >> self._half, x & mask
      for key in keys:
        left, right = right, left ^ (_mix(right ^ key) & mask)
      x = (left << self._half) | right
      if x < self.n:
        return x

"""Training metrics: model FLOPs, MFU, and averaging a window of step metrics."""

from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np

from jbtx.config import ModelConfig

# Dense bf16 peak FLOP/s of one device, matched by substring of `device.device_kind`
# (first match wins, so more specific names come first).
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("TPU v6 lite", 918e12), ("TPU v6e", 918e12), ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12), ("TPU v5p", 459e12), ("TPU v5", 459e12), ("TPU v4", 275e12),
    ("TPU v3", 123e12), ("B200", 2250e12), ("H200", 989e12), ("H100", 989e12),
    ("A100", 312e12), ("L4", 121e12),
)


def peak_flops(device_kind: str, configured: float = 0.0) -> float | None:
  """Peak FLOP/s of one device: `configured` if positive, else from `PEAK_FLOPS`, else None."""
  if configured > 0:
    return configured
  return next((flops for name, flops in PEAK_FLOPS if name in device_kind), None)


def train_flops_per_token(config: ModelConfig, seq_len: int) -> float:
  """Model FLOPs of one training token (forward + backward, rematerialisation not counted).

  `6 · P` for the active matmul parameters P (all active parameters but the input
  embedding table, a gather; a tied table is counted once, as the output layer),
  plus causal self-attention: `QKᵀ` and `AV` cost `4 · seq · n_heads · head_dim` per
  token and layer forward over the full sequence, half of that under the causal mask,
  times 3 for forward + backward.
  """
  gather = 0 if config.tie_embeddings else config.vocab_size * config.d_model
  matmul_params = config.num_active_params() - gather
  attention = 6 * config.n_layers * seq_len * config.n_heads * config.head_dim
  return 6.0 * matmul_params + attention


def mfu(tokens_per_second: float, flops_per_token: float, n_devices: int,
        peak: float | None) -> float | None:
  """Model FLOPs utilisation in [0, 1], or None when the peak is unknown."""
  if peak is None:
    return None
  return tokens_per_second * flops_per_token / (n_devices * peak)


class MetricWindow:
  """Step metrics since the last log line, kept on device until `summary`."""

  def __init__(self):
    self._metrics: list[dict[str, jax.Array]] = []
    self._start = time.perf_counter()

  def add(self, metrics: dict[str, jax.Array]) -> None:
    self._metrics.append(metrics)

  def __len__(self) -> int:
    return len(self._metrics)

  def summary(self) -> dict[str, Any]:
    """Means over the window (sums for "tokens" and "skipped"), then starts a new window.

    Expert load stays per layer and expert, `[layers, E]`; "seconds" is the wall time
    since the window began.
    """
    metrics = jax.device_get(self._metrics)
    out: dict[str, Any] = {"steps": len(metrics), "seconds": time.perf_counter() - self._start}
    for key in metrics[0]:
      values = np.stack([np.asarray(m[key], np.float64) for m in metrics])
      out[key] = values.sum(0) if key in ("tokens", "skipped") else values.mean(0)
    self._metrics, self._start = [], time.perf_counter()
    return out

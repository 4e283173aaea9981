"""The decoder applied to packed batches, as training, validation and scoring use it.

    logits, moe_stats = forward(model, params, batch)   # batch: tokens, positions,
                                                          # segment_ids, int [batch, seq]
    valid = valid_targets(batch["segment_ids"])           # bool [batch, seq - 1]

A packed row holds pieces of several documents (`jbtx.data.packing`); target t + 1 is
predicted from token t only when both belong to the same document.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from jbtx.models.moe import collect_moe_stats

Batch = dict[str, jax.Array]


def valid_targets(segment_ids: jax.Array) -> jax.Array:
  """bool `[batch, seq - 1]`: target t + 1 continues the document of token t (padding,
  segment 0, is never a target)."""
  return (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] != 0)


def forward(model: nn.Module, params: Any, batch: Batch, rng: jax.Array | None = None,
            step: jax.Array | None = None):
  """Logits `[batch, seq, vocab]` and the per-layer MoE statistics (empty for a dense
  model).

  `step` (the training step) drives schedules inside the model, e.g. the annealed
  Gumbel temperature of "sample_top1" routing; `rng` seeds router noise.
  """
  logits, state = model.apply(
      {"params": params}, batch["tokens"], positions=batch["positions"],
      segment_ids=batch["segment_ids"], step=step, mutable=["intermediates"],
      rngs={"router": rng} if rng is not None else None)
  return logits, collect_moe_stats(state.get("intermediates", {}))

"""Training compute and matched budgets: every FLOP count the pipeline compares.

    compute(config)          tokens and FLOPs of one training stage's run
    total_compute(parts)     their sum over several stages
    btx_compute(config)      BTX's: every domain expert's training plus the finetune
    seed_flops(config)       the seed's: its stage's, or those its checkpoint records
    matched_steps(config, m) steps of model m on the finetune batches with BTX's FLOPs

FLOPs are 6 · active parameters without the embedding table · tokens, plus causal
attention (`jbtx.training.metrics.train_flops_per_token`, the same count as MFU).
Each training stage records its `compute` in its `jbtx.json`; the results table adds
them up per row, and the baselines train for `matched_steps`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from jbtx.config import ConfigError, ExperimentConfig, ModelConfig
from jbtx.interop import checkpoint
from jbtx.pipeline.experiments import expert_config, finetune_config, seed_config
from jbtx.training.metrics import train_flops_per_token


def compute(config: ExperimentConfig) -> dict[str, float]:
  """Training tokens (all positions of the batches) and FLOPs of a stage's run."""
  tokens = config.train.steps * config.data.batch_size * config.data.seq_len
  flops = train_flops_per_token(config.model, config.data.seq_len) * tokens
  return {"tokens": tokens, "flops": flops}


def total_compute(parts: Sequence[Mapping[str, float]]) -> dict[str, float]:
  """The summed tokens and FLOPs of several stages' `compute`."""
  return {"tokens": sum(p["tokens"] for p in parts), "flops": sum(p["flops"] for p in parts)}


def btx_compute(config: ExperimentConfig) -> dict[str, float]:
  """BTX's training tokens and FLOPs: every expert's training plus the finetune."""
  return total_compute([*(compute(expert_config(config, d)) for d in config.btx.experts),
                        compute(finetune_config(config))])


def seed_flops(config: ExperimentConfig) -> float:
  """The seed's training FLOPs: its stage's, or those `btx.seed_checkpoint` records.

  Raises:
    ConfigError: ('btx.seed_checkpoint') for a checkpoint that records none (converted).
  """
  if not config.btx.seed_checkpoint:
    return compute(seed_config(config))["flops"]
  try:
    recorded = checkpoint.read_record(config.btx.seed_checkpoint)
  except checkpoint.CheckpointError as e:
    raise ConfigError("btx.seed_checkpoint", str(e)) from None
  flops = recorded.get("metrics", {}).get("compute", {}).get("flops")
  if not flops:
    raise ConfigError("btx.seed_checkpoint", f"{config.btx.seed_checkpoint} records no "
                      "training FLOPs (a converted checkpoint): a baseline from scratch "
                      "cannot be matched to the seed's training")
  return float(flops)


def matched_steps(config: ExperimentConfig, model: ModelConfig, with_seed: bool = False) -> int:
  """Steps of `model` on the finetune batches whose training FLOPs are BTX's (plus the
  seed's training with `with_seed`), to within one step's."""
  data = config.data
  per_step = train_flops_per_token(model, data.seq_len) * data.batch_size * data.seq_len
  budget = btx_compute(config)["flops"] + (seed_flops(config) if with_seed else 0.0)
  return max(1, round(budget / per_step))

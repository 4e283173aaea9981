"""Branch-Train-MiX on the built-in demo data, sized to run on a laptop CPU in minutes.

    python -m jbtx.train --config=configs/btx.py

Stage implemented so far: `seed` — a tiny dense Llama trained from scratch on the four
built-in demo domains (code, math, knowledge, general; byte tokens). The file lists
every key of `jbtx.config.ExperimentConfig` (`to_config_dict`), so any can be
overridden, e.g. --config.model.n_layers=8 --config.train.steps=2000
--config.mesh.fsdp=2 (but not the sub-keys of `model.moe`, None for this dense model;
configs/olmoe_tiny.py has them).
"""

import ml_collections

from jbtx.config import (
    DataConfig,
    ExperimentConfig,
    OptimizerConfig,
    TrainConfig,
    to_config_dict,
)
from jbtx.config.data import DomainConfig, TokenizerConfig
from jbtx.models import presets


def get_config() -> ml_collections.ConfigDict:
  domains = {name: DomainConfig(source="demo", name=name, weight=weight)
             for name, weight in [("code", 0.4), ("math", 0.3), ("knowledge", 0.1),
                                  ("general", 0.2)]}
  return to_config_dict(ExperimentConfig(
      seed=0,
      model=presets.get("tiny"),
      data=DataConfig(domains=domains, tokenizer=TokenizerConfig(type="byte"), seq_len=256,
                      batch_size=16),
      optimizer=OptimizerConfig(learning_rate=1e-3, warmup_steps=20, min_lr_ratio=0.1,
                                b1=0.9, b2=0.95, weight_decay=0.1, grad_clip_norm=1.0),
      train=TrainConfig(steps=300, log_every=20, eval_batches=8, eval_every=0,
                        sample_prompt="def ", sample_tokens=80, sample_temperature=0.8,
                        checkpoint_every=100, keep_last=2, keep_every=0,
                        async_checkpoints=True, max_skipped_steps=10,
                        peak_flops_per_device=0.0, tensorboard=True),
      profile_steps="",  # e.g. "10,15": trace steps 10-15 into seed/tensorboard/
      dump_hlo=False,
      reuse_host_memory=True,  # glibc keeps freed blocks for reuse (faster on CPU)
  ))

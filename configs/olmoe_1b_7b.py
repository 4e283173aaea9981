"""OLMoE-1B-7B trained from scratch (Muennighoff et al. 2024): 16 layers, d_model 2048,
64 experts of SwiGLU width 1024, top-8 of a softmax over all 64 without
renormalisation, QK-norm, load balancing 0.01 and router z-loss 0.001 (the
`olmoe_1b_7b` preset: 6.9B parameters, 1.3B active).

    python -m jbtx.train --config=configs/olmoe_1b_7b.py:tpu_v5p_64 --workdir=/mnt/bucket/olmoe
    python -m jbtx.compile --config=configs/olmoe_1b_7b.py:tpu_v5p_64 --topology=v5p-64

From the design's facts: AdamW with learning rate 4e-4, betas (0.9, 0.95), weight decay
0.1; 4M-token batches (1024 × 4096). Not from them: the step count (`STEPS`: set it to
your token budget), the warmup, and the layout that fits the platform. Set the
corpus (`DOMAINS`) and the tokenizer (OLMoE's is GPT-NeoX-20B's, 50280 ids, padded to
50304 in the embedding) to your files.
"""

import dataclasses

import ml_collections

from jbtx.config import (
    BTXConfig,
    DataConfig,
    ExperimentConfig,
    MeshConfig,
    OptimizerConfig,
    TrainConfig,
    to_config_dict,
)
from jbtx.config.data import DomainConfig, TokenizerConfig
from jbtx.models import presets

TOKENIZER = "olmoe/tokenizer.json"
DOMAINS = {"web": DomainConfig(source="files", prepare=True, splits={
    "train": "data/web/train/*.jsonl.gz", "validation": "data/web/validation/*.jsonl"})}
STEPS = 100_000  # 420B tokens


@dataclasses.dataclass(frozen=True)
class Platform:
  """The mesh (experts over the expert axis, FSDP over the rest) and micro-batches per
  1024-row batch, checked with `python -m jbtx.compile --topology=<topology>`."""

  mesh: MeshConfig
  grad_accum: int
  topology: str


PLATFORMS = {
    # TPU v5p-64 (32 chips, 95 GiB each): 8 experts per shard, 4 sequences per chip
    # per micro-batch.
    "tpu_v5p_64": Platform(MeshConfig(data=1, fsdp=-1, expert=8), 8, "v5p-64"),
}


def get_config(platform: str = "tpu_v5p_64") -> ml_collections.ConfigDict:
  if platform not in PLATFORMS:
    raise ValueError(f"unknown platform {platform!r}; choose one of {', '.join(PLATFORMS)}")
  layout = PLATFORMS[platform]
  return to_config_dict(ExperimentConfig(
      model=presets.get("olmoe_1b_7b", dtype="bfloat16", param_dtype="float32",
                        remat_policy="full"),
      data=DataConfig(domains=DOMAINS, tokenizer=TokenizerConfig(type="huggingface",
                                                                 path=TOKENIZER),
                      seq_len=4096, batch_size=1024),
      optimizer=OptimizerConfig(learning_rate=4e-4, warmup_steps=2000, min_lr_ratio=0.1,
                                b1=0.9, b2=0.95, weight_decay=0.1, grad_clip_norm=1.0,
                                grad_accum_steps=layout.grad_accum),
      train=TrainConfig(steps=STEPS, log_every=10, eval_batches=16, eval_every=1000,
                        sample_tokens=0, checkpoint_every=1000, keep_last=2,
                        keep_every=10_000),
      mesh=layout.mesh,
      btx=BTXConfig(experts={}),  # no BTX stages: the seed stage trains it from scratch
      reuse_host_memory=False,
  ))

"""Branch-Train-MiX at the paper's scale: a Llama-2 7B seed, math/code/wiki experts,
4 experts (the seed the 4th) with top-2 routing (Sukhbaatar et al. 2024).

    python -m jbtx.convert import --source=llama-2-7b --output=ckpt/llama2-7b --dtype=float32
    python -m jbtx.train --config=configs/llama2_7b_btx.py:tpu_v5p_128 --workdir=/mnt/bucket/btx7b
    python -m jbtx.train --config=configs/llama2_7b_btx.py:gpu_8 --workdir=/shared/btx7b
    python -m jbtx.compile --config=configs/llama2_7b_btx.py:tpu_v5p_128 --topology=v5p-128

The argument after ":" picks the platform (`PLATFORMS`): its mesh, micro-batches and
optimizer-state dtype, chosen so that every stage fits its devices' memory as
`python -m jbtx.compile` measures it (docs/compile.md). Set the dataset paths in
`DOMAINS` (local JSONL files prepared once into TFDS, or TFDS datasets you have
prepared) and the tokenizer path, or override them: --config.data.domains.math.splits.train=….

From the paper (DESIGN.md): AdamW with weight decay 0.1, peak learning rate 1e-4, 100
warmup steps, cosine decay to 10%; 4M-token batches (1024 × 4096); the finetune
mixture math 30.16%, code 40.31%, wiki 10.30%, seed data 19.23%. Not from it: the
step counts (`EXPERT_STEPS`, `FINETUNE_STEPS`: set them to your token budget) and
the layout that fits each platform.
"""

import dataclasses

import ml_collections

from jbtx.config import (
    BTXConfig,
    DataConfig,
    ExperimentConfig,
    MeshConfig,
    MoEConfig,
    OptimizerConfig,
    StageConfig,
    TrainConfig,
    to_config_dict,
)
from jbtx.config.data import DomainConfig, TokenizerConfig
from jbtx.models import presets

SEED_CHECKPOINT = "ckpt/llama2-7b"  # python -m jbtx.convert import ... --dtype=float32
TOKENIZER = "llama-2-7b/tokenizer.model"


def _files(name: str) -> DomainConfig:
  return DomainConfig(source="files", splits={"train": f"data/{name}/train/*.jsonl.gz",
                                              "validation": f"data/{name}/validation/*.jsonl"},
                      text_key="text", prepare=True)


# "seed" stands for the seed model's own pretraining distribution (a general web mix).
DOMAINS = {"math": _files("math"), "code": _files("code"), "wiki": _files("wiki"),
           "seed": _files("seed")}
FINETUNE_WEIGHTS = {"math": 30.16, "code": 40.31, "wiki": 10.30, "seed": 19.23}
EXPERT_STEPS = 12_000  # ~50B tokens per expert
FINETUNE_STEPS = 20_000  # ~84B tokens



@dataclasses.dataclass(frozen=True)
class Platform:
  """How the run is laid out on one kind of machine.

  Attributes:
    mesh: experts sharded 4 ways in the MoE stages (a data axis for the dense ones),
      FSDP over the rest; every parameter and moment is split over fsdp × expert.
    grad_accum: micro-batches per 1024-row batch.
    moment_dtype: Adam's moments' storage.
    topology: what `python -m jbtx.compile` checks it on (GPUs: a TPU slice of the
      same device count, with --device_memory_gib).
  """

  mesh: MeshConfig
  grad_accum: int
  moment_dtype: str
  topology: str


PLATFORMS = {
    # TPU v5p-128 (64 chips, 95 GiB each): 4 sequences per chip per micro-batch.
    "tpu_v5p_128": Platform(MeshConfig(data=1, fsdp=-1, expert=4), 4, "float32", "v5p-128"),
    # TPU v6e-64 (64 chips, 32 GiB each): 1 sequence per chip per micro-batch.
    "tpu_v6e_64": Platform(MeshConfig(data=1, fsdp=-1, expert=4), 16, "float32", "v6e-64"),
    # One host with 8 GPUs of 80 GB: 1 sequence per GPU per micro-batch, bfloat16
    # moments (with float32 ones the finetune takes 75.3 of 80 GiB: under the 10% margin).
    "gpu_8": Platform(MeshConfig(data=1, fsdp=2, expert=4), 128, "bfloat16", "v5p-16"),
}


def get_config(platform: str = "tpu_v5p_128") -> ml_collections.ConfigDict:
  if platform not in PLATFORMS:
    raise ValueError(f"unknown platform {platform!r}; choose one of {', '.join(PLATFORMS)}")
  layout = PLATFORMS[platform]
  stage = StageConfig(steps=EXPERT_STEPS, learning_rate=1e-4, warmup_steps=100)
  return to_config_dict(ExperimentConfig(
      seed=0,
      model=presets.get("llama2_7b", dtype="bfloat16", param_dtype="float32",
                        remat_policy="full", max_seq_len=4096),
      data=DataConfig(domains=DOMAINS, tokenizer=TokenizerConfig(type="sentencepiece",
                                                                 path=TOKENIZER),
                      seq_len=4096, batch_size=1024),
      optimizer=OptimizerConfig(learning_rate=1e-4, warmup_steps=100, min_lr_ratio=0.1,
                                b1=0.9, b2=0.95, weight_decay=0.1, grad_clip_norm=1.0,
                                grad_accum_steps=layout.grad_accum,
                                moment_dtype=layout.moment_dtype),
      train=TrainConfig(steps=EXPERT_STEPS, log_every=10, eval_batches=16, eval_every=1000,
                        sample_prompt="The", sample_tokens=0, checkpoint_every=500,
                        keep_last=2, keep_every=5000),
      mesh=layout.mesh,
      btx=BTXConfig(
          seed_checkpoint=SEED_CHECKPOINT,
          experts={"math": stage, "code": stage, "wiki": stage},
          seed_as_expert=True,
          moe=MoEConfig(n_experts=4, top_k=2, routing="topk", load_balance="btx",
                        load_balance_coef=0.01),
          finetune=StageConfig(steps=FINETUNE_STEPS, learning_rate=1e-4, warmup_steps=100),
          finetune_weights=FINETUNE_WEIGHTS,
          task_examples=0, export=True),
      reuse_host_memory=False,
  ))

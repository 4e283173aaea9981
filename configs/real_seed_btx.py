"""Branch-Train-MiX from a small real model (SmolLM2-135M, Llama-3.2-1B, Qwen2.5-0.5B, …)
on the demo domains, tokenized with the model's own tokenizer; docs/real_seeds.md.

    huggingface-cli download HuggingFaceTB/SmolLM2-135M --local-dir SmolLM2-135M
    python -m jbtx.convert import --source=SmolLM2-135M --output=ckpt/smollm2-135m
    python -m jbtx.train --config=configs/real_seed_btx.py \\
        --config.btx.seed_checkpoint=ckpt/smollm2-135m
    python -m jbtx.eval --workdir=runs/real_seed_btx

The seed is the converted checkpoint (`btx.seed_checkpoint`, default `SEED_CHECKPOINT`):
the model's shape is read from it (`btx.model_from_seed`), and the tokenizer files the
conversion copied into it are the data's tokenizer (`data.tokenizer.path` follows
`btx.seed_checkpoint` unless set). Code, math and knowledge experts branch from it, then
mix with the seed's FFN as the 4th expert, top-2, and the MoE is finetuned on all four
demo domains; eval (results.json) compares the seed, the experts, BTM, the seed trained
further for BTX's FLOPs ("dense") and BTX; export writes hf/ (Mixtral).

Budgets for one GPU (80 GB) and a 135M-1B seed: 1024-token rows, 16 per step, bf16
compute on float32 master weights with full rematerialisation (a 1B seed mixes into
a 3.6B-parameter MoE); 150 steps per expert and 300 of finetuning (the demo domains
hold ~4M tokens of code and far less of the rest: for a real study, point
`data.domains` at your data and scale the steps). `:smoke` runs every stage on CPU for
a few steps of 32-token rows, in minutes:

    python -m jbtx.train --config=configs/real_seed_btx.py:smoke \\
        --config.btx.seed_checkpoint=ckpt/smollm2-135m --workdir=runs/smoke
"""

import ml_collections

from jbtx.config import (
    BTXConfig,
    DataConfig,
    ExperimentConfig,
    OptimizerConfig,
    StageConfig,
    TrainConfig,
    to_config_dict,
)
from jbtx.config.data import DomainConfig, TokenizerConfig
from jbtx.models import presets

SEED_CHECKPOINT = "ckpt/smollm2-135m"
EXPERTS = ("code", "math", "knowledge")
WEIGHTS = {"code": 0.3, "math": 0.3, "knowledge": 0.2, "general": 0.2}  # the finetune's
SMOKE_EXPERTS = ("code", "math")


def _full() -> ExperimentConfig:
  expert = StageConfig(steps=150, learning_rate=5e-5, warmup_steps=15)
  return ExperimentConfig(
      # The shape is the seed's (btx.model_from_seed); SmolLM2-135M's stands in for it.
      model=presets.get("smollm2_135m", dtype="bfloat16", param_dtype="float32",
                        remat_policy="full", max_seq_len=2048),
      data=DataConfig(
          domains={name: DomainConfig(source="demo", name=name, weight=weight)
                   for name, weight in WEIGHTS.items()},
          tokenizer=TokenizerConfig(type="huggingface", path=SEED_CHECKPOINT),
          seq_len=1024, batch_size=16),
      optimizer=OptimizerConfig(learning_rate=1e-4, warmup_steps=30, min_lr_ratio=0.1,
                                b2=0.95, weight_decay=0.1, grad_clip_norm=1.0),
      train=TrainConfig(steps=300, log_every=10, eval_batches=8, checkpoint_every=100,
                        sample_prompt="def ", sample_tokens=0),
      btx=BTXConfig(
          seed_checkpoint=SEED_CHECKPOINT, model_from_seed=True,
          experts={name: expert for name in EXPERTS},
          finetune=StageConfig(steps=300, learning_rate=1e-4, warmup_steps=30),
          finetune_weights=WEIGHTS,
          task_examples=32, task_max_tokens={"math": 96, "knowledge": 16},
          baselines=("btm", "dense")))


def _smoke(config: ExperimentConfig) -> ExperimentConfig:
  """Every stage on CPU: float32, 2 experts, 3 steps each of 4 rows of 32 tokens."""
  short = StageConfig(steps=3, learning_rate=1e-4, warmup_steps=1)
  return ExperimentConfig(
      model=presets.get("smollm2_135m", max_seq_len=2048),
      data=DataConfig(domains=config.data.domains, tokenizer=config.data.tokenizer,
                      seq_len=32, batch_size=4),
      optimizer=OptimizerConfig(learning_rate=1e-4, warmup_steps=1),
      train=TrainConfig(steps=3, log_every=1, eval_batches=1, checkpoint_every=3,
                        sample_tokens=0, tensorboard=False),
      btx=BTXConfig(
          seed_checkpoint=SEED_CHECKPOINT, model_from_seed=True,
          experts={name: short for name in SMOKE_EXPERTS}, finetune=short,
          finetune_weights=WEIGHTS, task_examples=2,
          task_max_tokens={"math": 4, "knowledge": 4}))


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  if variant not in ("", "smoke"):
    raise ValueError(f"unknown variant {variant!r}; use configs/real_seed_btx.py or "
                     "configs/real_seed_btx.py:smoke")
  experiment = _full()
  config = to_config_dict(_smoke(experiment) if variant == "smoke" else experiment)
  # The tokenizer is the seed's own (convert import copies its files), wherever it is.
  config.data.tokenizer.path = config.btx.get_ref("seed_checkpoint") + ""
  return config

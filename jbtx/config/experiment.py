"""The whole experiment: what one `python -m jbtx.train` run needs."""

from __future__ import annotations

import dataclasses

from jbtx.config.base import ConfigError
from jbtx.config.base import require as _require
from jbtx.config.btm import BTMConfig
from jbtx.config.btx import BTXConfig
from jbtx.config.data import DataConfig
from jbtx.config.distributed import DistributedConfig
from jbtx.config.evaluation import EvalConfig
from jbtx.config.llama_moe import LlamaMoEConfig
from jbtx.config.mesh import MeshConfig
from jbtx.config.model import ModelConfig
from jbtx.config.olmoe import OLMoEConfig
from jbtx.config.optimizer import OptimizerConfig
from jbtx.config.training import TrainConfig, profile_window
from jbtx.config.upcycle import UpcycleConfig

BYTE_VOCAB_SIZE = 259  # jbtx.data.tokenizers.ByteTokenizer.vocab_size


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """Everything one `python -m jbtx.train` run needs."""

  model: ModelConfig
  seed: int = 0
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
  distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
  btx: BTXConfig = dataclasses.field(default_factory=BTXConfig)
  btm: BTMConfig = dataclasses.field(default_factory=BTMConfig)
  upcycle: UpcycleConfig = dataclasses.field(default_factory=UpcycleConfig)
  llama_moe: LlamaMoEConfig = dataclasses.field(default_factory=LlamaMoEConfig)
  olmoe: OLMoEConfig = dataclasses.field(default_factory=OLMoEConfig)
  eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
  profile_steps: str = ""  # "FIRST,LAST": trace these steps (jbtx.training.profiling)
  dump_hlo: bool = False  # write the train step's HLO under <stage>/hlo/
  reuse_host_memory: bool = True  # glibc keeps freed blocks for reuse (jbtx.runtime.host_memory)

  def __post_init__(self):
    try:
      window = profile_window(self.profile_steps)
    except ValueError as e:
      raise ConfigError("profile_steps", str(e)) from None
    _require(window is None or window[1] <= self.train.steps, "profile_steps",
             f"ends after train.steps ({self.train.steps}), got {self.profile_steps!r}")
    _require(self.data.seq_len <= self.model.max_seq_len, "data.seq_len",
             f"exceeds model.max_seq_len ({self.model.max_seq_len}), got {self.data.seq_len}")
    _require(self.data.tokenizer.type != "byte" or self.model.vocab_size >= BYTE_VOCAB_SIZE,
             "model.vocab_size", f"data.tokenizer.type 'byte' uses byte tokens, which need "
             f"at least {BYTE_VOCAB_SIZE} ids, got {self.model.vocab_size}")
    _require(self.optimizer.warmup_steps <= self.train.steps, "optimizer.warmup_steps",
             f"exceeds train.steps ({self.train.steps}), got {self.optimizer.warmup_steps}")
    _require(self.data.batch_size % self.optimizer.grad_accum_steps == 0,
             "optimizer.grad_accum_steps",
             f"must divide data.batch_size ({self.data.batch_size}), "
             f"got {self.optimizer.grad_accum_steps}")
    if self.btx.experts:
      _check_btx(self)


def _check_btx(config: ExperimentConfig) -> None:
  """The BTX settings that depend on the model and the data (see `BTXConfig`); each
  method's own checks are its stage kind's (`jbtx.pipeline.registry.validate`)."""
  btx, model = config.btx, config.model
  _require(model.moe is None, "model.moe",
           "a BTX seed is a dense model (btx.experts is set); MoE layers come from the mix")
  for name in btx.experts:
    _require(name in config.data.domains, f"btx.experts.{name}",
             f"not a domain of data.domains ({', '.join(config.data.domains)})")
  for name in btx.finetune_weights:
    _require(name in config.data.domains, f"btx.finetune_weights.{name}",
             f"not a domain of data.domains ({', '.join(config.data.domains)})")
  for name in btx.mix_weights:
    _require(name in btx.expert_names, f"btx.mix_weights.{name}",
             f"not a mixed model ({', '.join(btx.expert_names)})")
  _require(not btx.finetune_weights or sum(btx.finetune_weights.values()) > 0,
           "btx.finetune_weights", "the weights sum to 0")
  _require(not btx.mix_weights or sum(btx.mix_weights.values()) > 0, "btx.mix_weights",
           "the weights sum to 0")
  for spec in config.data.domains.values():
    if spec.source == "demo" and spec.name in ("math", "knowledge") and btx.task_examples:
      _require(spec.name in btx.task_max_tokens, "btx.task_max_tokens",
               f"needs an entry for the demo task domain {spec.name!r}")
  _require(btx.train_btx or btx.baselines, "btx.train_btx",
           "is False and btx.baselines is empty: there is nothing to run after the seed")
  _require(btx.moe.every == 1 and btx.moe.n_shared_experts == 0, "btx.moe.every",
           "BTX mixes every layer's FFN into routed experts (every = 1, no shared experts)")
  if btx.ffn == "split":
    _require(model.d_ff % btx.split_chunks == 0, "btx.split_chunks",
             f"must divide model.d_ff ({model.d_ff}), got {btx.split_chunks}")
  n_experts = len(btx.expert_names) * (btx.split_chunks if btx.ffn == "split" else 1)
  top_k = btx.moe.top_k * (btx.split_chunks if btx.ffn == "split" else 1)
  _require(top_k <= n_experts, "btx.moe.top_k",
           f"exceeds the {n_experts} mixed experts (after splitting), got {btx.moe.top_k}")

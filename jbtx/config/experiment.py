"""The whole experiment: what one `python -m jbtx.train` run needs."""

from __future__ import annotations

import dataclasses

from jbtx.config.base import ConfigError
from jbtx.config.base import require as _require
from jbtx.config.data import DataConfig
from jbtx.config.distributed import DistributedConfig
from jbtx.config.model import ModelConfig
from jbtx.config.optimizer import OptimizerConfig
from jbtx.config.parallel import MeshConfig
from jbtx.config.training import TrainConfig, profile_window

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
  profile_steps: str = ""  # "FIRST,LAST": trace these steps (jbtx.training.profiling)
  dump_hlo: bool = False  # write the train step's HLO under <stage>/hlo/
  reuse_host_memory: bool = True  # glibc keeps freed blocks for reuse (jbtx.host_memory)

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

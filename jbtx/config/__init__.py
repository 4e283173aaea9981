"""Typed, validated configuration, one module per concern.

`base` holds the ConfigDict <-> dataclass machinery (`from_mapping`, `ConfigError`,
`to_config_dict`); `model`, `data`, `optimizer`, `mesh`, `training`, `distributed`, `evaluation`,
the methods' groups (`btx`, `btm`, `upcycle`, `llama_moe`, `olmoe`) and `experiment`
hold the dataclasses. Import them from here:
`from jbtx.config import ExperimentConfig, from_mapping`.
"""

from jbtx.config.base import (
    ConfigError,
    check_overrides,
    exit_on_moved_overrides,
    from_mapping,
    to_config_dict,
    to_dict,
)
from jbtx.config.btm import BTMConfig
from jbtx.config.btx import BTXConfig, StageConfig
from jbtx.config.data import DataConfig
from jbtx.config.evaluation import EvalConfig
from jbtx.config.experiment import BYTE_VOCAB_SIZE, ExperimentConfig
from jbtx.config.llama_moe import LlamaMoEConfig
from jbtx.config.mesh import MESH_AXES, MeshConfig
from jbtx.config.model import ModelConfig, MoEConfig, RopeScalingConfig
from jbtx.config.olmoe import OLMoEConfig
from jbtx.config.optimizer import OptimizerConfig
from jbtx.config.training import TrainConfig
from jbtx.config.upcycle import UpcycleConfig

__all__ = [
    "BYTE_VOCAB_SIZE",
    "MESH_AXES",
    "BTMConfig",
    "BTXConfig",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "ExperimentConfig",
    "LlamaMoEConfig",
    "MeshConfig",
    "MoEConfig",
    "ModelConfig",
    "OLMoEConfig",
    "OptimizerConfig",
    "RopeScalingConfig",
    "StageConfig",
    "TrainConfig",
    "UpcycleConfig",
    "check_overrides",
    "exit_on_moved_overrides",
    "from_mapping",
    "to_config_dict",
    "to_dict",
]

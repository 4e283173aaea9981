"""BTX's mix: the seed and the experts become one MoE checkpoint, a layer at a time.

Each model's FFN becomes one expert of every layer's MoE (`jbtx.methods.mix`), the
rest is averaged with `btx.mix_weights`, and the routers are new (`btx.router_init`).
The checkpoint is written with its layers unrolled, one layer at a time, from
TensorStore reads of the models' checkpoints, so N models are never in memory.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jbtx.config import ConfigError, ExperimentConfig, ModelConfig
from jbtx.config.btx import SEED_EXPERT
from jbtx.data import loader
from jbtx.inference.sharded import params_sharding
from jbtx.interop import checkpoint
from jbtx.interop.tensor_source import CheckpointSource
from jbtx.methods import mix, router_init
from jbtx.models.llama import Llama
from jbtx.pipeline import experiments, identity
from jbtx.pipeline.registry import Stage, register
from jbtx.pipeline.stages.expert import expert_stages
from jbtx.pipeline.stages.seed import SEED
from jbtx.pipeline.workdir import Paths
from jbtx.runtime import sharding
from jbtx.runtime.signals import StopSignal

MIX = "mix"
_IDENTITY_KEYS = ("seed_checkpoint", "experts", "seed_as_expert", "mix_weights", "ffn",
                  "split_chunks", "router_init", "router_init_batches")


def mixing_weights(config: ExperimentConfig) -> list[float]:
  """Averaging weights of the mixed models, in expert order (uniform by default)."""
  given = config.btx.mix_weights
  return [given.get(name, 0.0) if given else 1.0 for name in config.btx.expert_names]


def mix_identity(config: ExperimentConfig) -> dict[str, Any]:
  """What the mixed checkpoint depends on (the finetune's identity includes it)."""
  btx = config.btx
  return {"seed": config.seed, "model": identity.plain(experiments.moe_model_config(config)),
          "btx": {k: identity.plain(getattr(btx, k)) for k in _IDENTITY_KEYS},
          **({"data": identity.plain(config.data)} if btx.router_init == "hidden" else {})}


def _hidden_routers(config: ExperimentConfig, paths: Paths,
                    moe_config: ModelConfig) -> Callable[[int], np.ndarray]:
  """`layer -> router [embed, E]` from the seed's mean FFN inputs on each expert's data
  (the seed sharded over the experiment's mesh)."""
  seed_dir = paths.model_dir(SEED_EXPERT)
  model = Llama(checkpoint.load_config(seed_dir))
  mesh = sharding.make_mesh(config.mesh)
  params = jax.device_put(checkpoint.load_params_for(seed_dir, model.config),
                          params_sharding(model, mesh))
  means = []
  for name in config.btx.expert_names:
    data = (config.data if name == SEED_EXPERT
            else experiments.expert_config(config, name).data)
    batches = loader.train_iterator(data, seed=config.seed)
    try:
      means.append(router_init.mean_hidden(
          model, params, (next(batches) for _ in range(config.btx.router_init_batches)), mesh))
    finally:
      batches.close()
  kernels = router_init.hidden_routers(np.stack(means), moe_config.param_dtype)
  chunks = moe_config.moe.n_experts // len(means)  # split: a chunk takes its FFN's column
  return lambda layer: np.repeat(kernels[layer], chunks, axis=-1)


@register
class Mix(Stage):
  """The mixed MoE checkpoint (`mix/`, layers unrolled)."""

  name = MIX
  phase = 20

  def stages(self, config: ExperimentConfig) -> list[str]:
    return [MIX] if config.btx.experts and config.btx.train_btx else []

  def inputs(self, config: ExperimentConfig, stage: str) -> list[str]:
    return [SEED, *expert_stages(config)]

  def identity(self, config: ExperimentConfig, stage: str) -> dict[str, Any]:
    return mix_identity(config)

  def run(self, config: ExperimentConfig, paths: Paths, stop: StopSignal, stage: str) -> None:
    """Builds the MoE checkpoint; short and atomic, so a signal stops the run after it."""
    del stop
    btx = config.btx
    names = btx.expert_names
    sources = [CheckpointSource(paths.model_dir(n)) for n in names]
    try:
      mix.check_compatible(sources, names)
    except ValueError as e:
      raise ConfigError("btx.experts", str(e)) from None
    moe_config = experiments.moe_model_config(config)
    unrolled = dataclasses.replace(moe_config, scan_layers=False)
    weights = mixing_weights(config)
    out = paths.stage_dir(MIX)
    # Every process: the hidden-state routers are a computation over the whole mesh.
    routers = (mix.random_routers(moe_config, config.seed) if btx.router_init == "random"
               else _hidden_routers(config, paths, moe_config))
    if jax.process_index() != 0:
      return
    staging = out / "model"
    for stale in [staging, out / checkpoint.PARAMS_DIR, *out.glob(".model.partial-*")]:
      if stale.exists():  # left by a killed mix
        shutil.rmtree(stale)
    parts = mix.mixed_parts(sources, unrolled, btx.ffn, btx.split_chunks, weights, routers)
    checkpoint.save_parts(staging, unrolled, parts, extra={
        "stage": MIX, "experts": list(names), "weights": weights,
        "metrics": {"compute": {"tokens": 0, "flops": 0.0}}})
    (staging / checkpoint.PARAMS_DIR).rename(out / checkpoint.PARAMS_DIR)
    (staging / checkpoint.CONFIG_FILE).rename(out / checkpoint.CONFIG_FILE)  # complete
    staging.rmdir()

"""The LLaMA-MoE baseline's starting point: the seed with every FFN split into experts.

    seed FFN of layer l  --partition (llama_moe.split)-->  experts [E, embed, m] (+ residual)
    router               new (the MoE layer's own initialiser, e.g. the noisy MLP gate)
    everything else      copied

The partitions come from `jbtx.btx.split`; the sharing methods first measure neuron
importance on `llama_moe.importance_batches` training batches of each domain of the
finetune mixture (expert e works for domain e mod D).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jbtx import checkpoint
from jbtx.btx import split, stages
from jbtx.config import ConfigError, ExperimentConfig, ModelConfig
from jbtx.data import pipeline as data_pipeline
from jbtx.models.llama import Llama, stack_layers
from jbtx.models.moe import MoE
from jbtx.training.loop import log


def domains(config: ExperimentConfig) -> list[str]:
  """The domains importance is measured on: those the finetune mixture samples."""
  return [d for d, spec in stages.finetune_config(config).data.domains.items() if spec.weight > 0]


def _domain_importance(config: ExperimentConfig, model: Llama, params: Any,
                       domain: str) -> np.ndarray:
  spec = dataclasses.replace(config.data.domains[domain], weight=1.0)
  data = dataclasses.replace(config.data, domains={domain: spec}, reweighting="none")
  batches = data_pipeline.train_iterator(data, seed=config.seed)
  try:
    return split.importance(model, params, (next(batches)
                                            for _ in range(config.llama_moe.importance_batches)))
  finally:
    batches.close()


def partitions(config: ExperimentConfig, dense: dict[str, Any]) -> list[split.Partition]:
  """Every layer's partition of its neurons, for `config.llama_moe.split`.

  Args:
    config: the experiment.
    dense: the seed's parameters with unrolled layers (`layers_{i}/mlp/…`).
  """
  llama_moe, n_layers = config.llama_moe, config.model.n_layers
  n_experts = llama_moe.moe.n_experts
  if llama_moe.split == "random":
    return [split.random_partition(config.model.d_ff, n_experts,
                                   np.random.default_rng([config.seed, layer]))
            for layer in range(n_layers)]
  if llama_moe.split == "clustering":
    return [split.clustering_partition(np.asarray(dense[f"layers_{i}"]["mlp"]["up"]["kernel"]),
                                       n_experts, seed=config.seed,
                                       iterations=llama_moe.clustering_iterations)
            for i in range(n_layers)]
  names = domains(config)
  log(f"[{stages.LLAMA_MOE}] neuron importance over {llama_moe.importance_batches} batches "
      f"of each of {', '.join(names)}")
  model = Llama(dataclasses.replace(config.model, scan_layers=False, remat_policy="none"))
  scores = np.stack([_domain_importance(config, model, dense, d) for d in names])  # [D, L, f]
  return [split.sharing_partition(scores[:, layer], n_experts, llama_moe.shared_experts,
                                  inter=llama_moe.split == "sharing_inter")
          for layer in range(n_layers)]


def _fresh_routers(config: ModelConfig, seed: int) -> list[dict[str, np.ndarray]]:
  """Each layer's new router parameters (`router*`), from the MoE layer's initialiser."""

  @jax.jit
  def routers(layer):
    x = jnp.zeros((1, 1, config.d_model), jnp.float32)
    params = nn.meta.unbox(MoE(config).init(jax.random.fold_in(jax.random.key(seed), layer),
                                            x)["params"])
    return {k: v for k, v in params.items() if k.startswith("router")}

  return [jax.tree.map(np.asarray, routers(layer)) for layer in range(config.n_layers)]


def split_params(dense: dict[str, Any], config: ModelConfig,
                 layer_partitions: list[split.Partition], seed: int) -> dict[str, Any]:
  """The MoE model `config` from a dense model's unrolled parameters.

  Args:
    dense: the dense model's parameters, layers unrolled (`layers_{i}`).
    config: the split model (`moe` from `stages.llama_moe_model_config`).
    layer_partitions: each layer's neurons by expert.
    seed: seeds the new routers (one stream per layer).

  Returns:
    The parameter tree of `config`, in its layout (scanned or unrolled).
  """
  params = {k: v for k, v in dense.items() if not k.startswith("layers_")}
  routers = _fresh_routers(config, seed)
  for layer, partition in enumerate(layer_partitions):
    block = dict(dense[f"layers_{layer}"])
    ffn = {k: v["kernel"] for k, v in block.pop("mlp").items()}
    block["moe"] = split.split_ffn(ffn, partition) | routers[layer]
    params[f"layers_{layer}"] = block
  return stack_layers(params, config.n_layers) if config.scan_layers else params


def initial_params(config: ExperimentConfig, seed_dir) -> dict[str, Any]:
  """The LLaMA-MoE stage's initial parameters: the seed in `seed_dir`, split."""
  unrolled = dataclasses.replace(config.model, scan_layers=False)
  dense = checkpoint.load_params_for(seed_dir, unrolled)
  model = stages.llama_moe_model_config(config)
  log(f"[{stages.LLAMA_MOE}] splitting the seed's FFNs ({config.model.d_ff} neurons) into "
      f"{model.moe.n_experts} experts of {model.moe.d_ff} ({config.llama_moe.split})")
  return split_params(dense, model, partitions(config, dense), config.seed)


def reference_losses(seed_dir) -> dict[str, float]:
  """The seed's final validation loss per domain, from its `jbtx.json`."""
  record = checkpoint.read_record(seed_dir)
  try:
    return dict(record["metrics"]["validation"]["domains"])
  except KeyError:
    raise ConfigError("llama_moe.reweighting", f"'loss' needs reference losses, and the seed "
                      f"{seed_dir} has no validation losses recorded (a converted seed?): set "
                      "data.domains.<domain>.reference_loss for every domain") from None

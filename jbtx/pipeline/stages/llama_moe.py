"""LLaMA-MoE (`btx.baselines` lists "llama_moe"): the seed with every FFN split into
`llama_moe.moe.n_experts` experts of its neurons, trained for BTX's FLOPs.

    seed FFN of layer l  --partition (llama_moe.split)-->  experts [E, embed, m] (+ residual)
    router               new (the MoE layer's own initialiser, e.g. the noisy MLP gate)
    everything else      copied

The partitions come from `jbtx.methods.split`; the sharing methods first measure neuron
importance on `llama_moe.importance_batches` training batches of each domain of the
finetune mixture (expert e works for domain e mod D). With `llama_moe.reweighting =
"loss"` the domains are re-weighted every `llama_moe.reweight_every` steps towards
reference losses (a domain's `reference_loss`, else the seed's own validation loss).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from jbtx.config import ConfigError, ExperimentConfig, ModelConfig
from jbtx.config.btx import SEED_EXPERT
from jbtx.config.llama_moe import expert_width
from jbtx.data import loader
from jbtx.interop import checkpoint
from jbtx.methods import split
from jbtx.models.llama import Llama
from jbtx.pipeline import experiments, identity
from jbtx.pipeline.baseline import TrainedBaseline
from jbtx.pipeline.registry import register
from jbtx.pipeline.workdir import Paths
from jbtx.runtime.distributed import log

LLAMA_MOE = "llama_moe"


def domains(config: ExperimentConfig) -> list[str]:
  """The domains importance is measured on: those the finetune mixture samples."""
  return [d for d, spec in experiments.finetune_config(config).data.domains.items()
          if spec.weight > 0]


def _domain_importance(config: ExperimentConfig, model: Llama, params: Any,
                       domain: str) -> np.ndarray:
  batches = loader.train_iterator(config.data.single_domain(domain), seed=config.seed)
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
  log(f"[{LLAMA_MOE}] neuron importance over {llama_moe.importance_batches} batches "
      f"of each of {', '.join(names)}")
  model = Llama(dataclasses.replace(config.model, scan_layers=False, remat_policy="none"))
  scores = np.stack([_domain_importance(config, model, dense, d) for d in names])  # [D, L, f]
  return [split.sharing_partition(scores[:, layer], n_experts, llama_moe.shared_experts,
                                  inter=llama_moe.split == "sharing_inter")
          for layer in range(n_layers)]


def reference_losses(seed_dir: Any) -> dict[str, float]:
  """The seed's final validation loss per domain, from its `jbtx.json`."""
  record = checkpoint.read_record(seed_dir)
  try:
    return dict(record["metrics"]["validation"]["domains"])
  except KeyError:
    raise ConfigError("llama_moe.reweighting", f"'loss' needs reference losses, and the seed "
                      f"{seed_dir} has no validation losses recorded (a converted seed?): set "
                      "data.domains.<domain>.reference_loss for every domain") from None


@register
class LlamaMoE(TrainedBaseline):
  name = LLAMA_MOE
  row_order = 32

  def model_config(self, config: ExperimentConfig) -> ModelConfig:
    """The split seed: `llama_moe.moe` layers of the seed's neurons."""
    llama_moe = config.llama_moe
    moe = llama_moe.moe
    shared = llama_moe.shared_experts if llama_moe.split == "sharing_inter" else 0
    width, _ = expert_width(config.model.d_ff, moe.n_experts, llama_moe.split,
                            llama_moe.shared_experts)
    scale = moe.n_experts / moe.top_k if llama_moe.scale_outputs else 1.0
    moe = dataclasses.replace(moe, d_ff=width, n_shared_experts=shared, output_scale=scale)
    return dataclasses.replace(config.model, moe=moe)

  def identity(self, config: ExperimentConfig, stage: str) -> dict[str, Any]:
    tree = identity.training(self.experiment(config, stage))
    return tree | {"llama_moe": identity.plain(config.llama_moe)} | {
        "from_seed": super().identity(config, stage)["from_seed"]}

  def training_experiment(self, config: ExperimentConfig, paths: Paths) -> ExperimentConfig:
    """With dynamic re-weighting: evaluations every `llama_moe.reweight_every` steps
    re-weight the mixture towards the reference losses."""
    derived = self.experiment(config, self.name)
    if config.llama_moe.reweighting == "none":
      return derived
    references = reference_losses(paths.model_dir(SEED_EXPERT))
    domains_ = {d: spec if spec.reference_loss is not None
                else dataclasses.replace(spec, reference_loss=references[d])
                for d, spec in derived.data.domains.items()}
    train = dataclasses.replace(derived.train, eval_every=config.llama_moe.reweight_every)
    return dataclasses.replace(derived, train=train, data=dataclasses.replace(
        derived.data, domains=domains_, reweighting="loss"))

  def initial_params(self, config: ExperimentConfig, paths: Paths,
                     derived: ExperimentConfig) -> Callable[[], Any]:
    def split_seed() -> dict[str, Any]:
      unrolled = dataclasses.replace(config.model, scan_layers=False)
      dense = checkpoint.load_params_for(paths.model_dir(SEED_EXPERT), unrolled)
      model = self.model_config(config)
      log(f"[{LLAMA_MOE}] splitting the seed's FFNs ({config.model.d_ff} neurons) into "
          f"{model.moe.n_experts} experts of {model.moe.d_ff} ({config.llama_moe.split})")
      return split.split_params(dense, model, partitions(config, dense), config.seed)

    return split_seed

  def validate(self, config: ExperimentConfig) -> None:
    """The split's widths against the seed's FFN (`expert_width`)."""
    llama_moe = config.llama_moe
    try:
      expert_width(config.model.d_ff, llama_moe.moe.n_experts, llama_moe.split,
                   llama_moe.shared_experts)
    except ValueError as e:
      raise ConfigError("llama_moe.moe.n_experts", f"{e}, for the seed's FFN") from None

"""The experiments BTX's training stages run, derived from the whole experiment.

Each training stage is an ordinary `ExperimentConfig` (model, data, steps, optimizer)
handed to the training engine (`jbtx.training.loop.train_stage`):

    seed_config          the experiment's model on its data
    expert_config        the seed's model on one domain, the expert's own schedule
    finetune_config      the mixed MoE (`moe_model_config`) on the finetune mixture
    eval_config          every domain of the data, for validation

A baseline's experiment is `jbtx.pipeline.baseline.baseline_config`: its model on the
finetune mixture for BTX's training FLOPs (`jbtx.pipeline.budgets`).
"""

from __future__ import annotations

import dataclasses

from jbtx.config import BTXConfig, ExperimentConfig, ModelConfig, StageConfig
from jbtx.config.training import profile_window


def with_training(config: ExperimentConfig, stage: StageConfig) -> ExperimentConfig:
  """`config` with the stage's steps, learning rate and warmup where set, and without
  the BTX settings (which the training engine does not read)."""
  steps = stage.steps or config.train.steps
  optimizer = dataclasses.replace(
      config.optimizer, learning_rate=stage.learning_rate or config.optimizer.learning_rate,
      warmup_steps=(stage.warmup_steps if stage.warmup_steps >= 0
                    else min(config.optimizer.warmup_steps, steps)))
  window = profile_window(config.profile_steps)  # traced only where the stage has those steps
  profile = config.profile_steps if window and window[1] <= steps else ""
  return dataclasses.replace(config, train=dataclasses.replace(config.train, steps=steps),
                             optimizer=optimizer, btx=BTXConfig(), profile_steps=profile)


def freezing_only_moe(config: ExperimentConfig) -> ExperimentConfig:
  """`config` freezing nothing if its model is dense: `optimizer.freeze` names MoE
  parameters (experts, routers), so it applies to MoE stages (the BTX finetune)."""
  if config.model.moe is not None:
    return config
  return dataclasses.replace(config,
                             optimizer=dataclasses.replace(config.optimizer, freeze="none"))


def seed_config(config: ExperimentConfig) -> ExperimentConfig:
  """The seed stage: the experiment's model on its data, without the BTX settings."""
  return freezing_only_moe(dataclasses.replace(config, btx=BTXConfig()))


def expert_config(config: ExperimentConfig, domain: str) -> ExperimentConfig:
  """Expert `domain`: the seed's model trained on that domain alone, its own schedule."""
  derived = with_training(config, config.btx.experts[domain])
  return freezing_only_moe(dataclasses.replace(derived,
                                               data=config.data.single_domain(domain)))


def moe_model_config(config: ExperimentConfig) -> ModelConfig:
  """The mixed model: the seed's decoder with every FFN an MoE layer of the mixed experts.

  `n_experts` = mixed models × split chunks, expert width = d_ff / chunks, top-k × chunks.
  """
  btx = config.btx
  chunks = btx.split_chunks if btx.ffn == "split" else 1
  moe = dataclasses.replace(btx.moe, n_experts=len(btx.expert_names) * chunks,
                            top_k=btx.moe.top_k * chunks, d_ff=config.model.d_ff // chunks)
  return dataclasses.replace(config.model, moe=moe)


def finetune_config(config: ExperimentConfig) -> ExperimentConfig:
  """The MoE finetune: the mixed model on the finetune mixture, its own schedule."""
  weights = config.btx.finetune_weights
  domains = ({name: dataclasses.replace(spec, weight=weights.get(name, 0.0))
              for name, spec in config.data.domains.items()} if weights
             else config.data.domains)
  data = dataclasses.replace(config.data, domains=domains)
  derived = with_training(config, config.btx.finetune)
  return dataclasses.replace(derived, data=data, model=moe_model_config(config))


def eval_config(config: ExperimentConfig) -> ExperimentConfig:
  """Validation of every model on every domain (the weights do not matter there)."""
  domains = {name: dataclasses.replace(spec, weight=1.0) if spec.weight == 0 else spec
             for name, spec in config.data.domains.items()}
  return dataclasses.replace(config, data=dataclasses.replace(config.data, domains=domains))

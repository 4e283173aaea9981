"""The BTX stages and the experiment each one runs, derived from the whole experiment.

    seed -> expert/<domain> (one per btx.experts) -> mix -> finetune -> eval -> export

and the baselines of `btx.baselines` before eval: upcycle, dense (trained from the
seed) and btm (evaluated from the experts; with `btm.clusters` = K, c-BTM's stages
clusters -> cluster/0 … cluster/K-1 first).

Each training stage is an ordinary `ExperimentConfig` (model, data, steps, optimizer)
handed to the training engine; the functions here derive it. A stage's identity
(`stage_identity`) is the part of the experiment its output depends on: a workdir
whose stage was made with another identity is refused, naming the keys.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

from jbtx.config import BTXConfig, ExperimentConfig, ModelConfig, StageConfig, to_dict
from jbtx.config.data import DomainConfig
from jbtx.config.llama_moe import expert_width
from jbtx.config.training import profile_window
from jbtx.training.loop import compute, total_compute
from jbtx.training.metrics import train_flops_per_token

SEED, MIX, FINETUNE, EVAL, EXPORT = "seed", "mix", "finetune", "eval", "export"
# The baselines (`btx.baselines`); the last four are trained.
BTM, UPCYCLE, DENSE, LLAMA_MOE, OLMOE = "btm", "upcycle", "dense", "llama_moe", "olmoe"
TRAINED_BASELINES = (UPCYCLE, DENSE, LLAMA_MOE, OLMOE)
CLUSTERS = "clusters"  # c-BTM's clustering of the training documents
EXPERT_PREFIX, CLUSTER_PREFIX = "expert/", "cluster/"

# Keys that change how a stage runs or reports, never what it computes.
_RUN_ONLY_KEYS = ("train.log_every", "train.checkpoint_every", "train.keep_last",
                  "train.keep_every", "train.async_checkpoints", "train.tensorboard",
                  "train.max_skipped_steps", "train.peak_flops_per_device",
                  "data.prefetch", "data.data_dir", "data.tfds_data_dir", "profile_steps",
                  "dump_hlo", "reuse_host_memory")
_RUN_ONLY_GROUPS = ("mesh.", "distributed.")


def expert_stage(domain: str) -> str:
  return f"{EXPERT_PREFIX}{domain}"


def cluster_stage(index: int) -> str:
  return f"{CLUSTER_PREFIX}{index}"


def uses_domain_experts(config: ExperimentConfig) -> bool:
  """Whether the run trains BTX's domain experts (for BTX, or for BTM on them)."""
  btx = config.btx
  return bool(btx.experts) and (btx.train_btx or (BTM in btx.baselines
                                                  and not config.btm.clusters))


def uses_seed(config: ExperimentConfig) -> bool:
  """Whether anything starts from the seed (OLMoE alone does not: it starts from scratch)."""
  btx = config.btx
  return not btx.experts or btx.train_btx or any(b != OLMOE for b in btx.baselines)


def stage_names(config: ExperimentConfig) -> list[str]:
  """Every stage of the experiment, in order (the seed alone without BTX experts)."""
  btx = config.btx
  if not btx.experts:
    return [SEED]
  stages = [SEED] if uses_seed(config) else []
  if uses_domain_experts(config):
    stages += map(expert_stage, btx.experts)
  if btx.train_btx:
    stages += [MIX, FINETUNE]
  for name in btx.baselines:
    if name != BTM:
      stages.append(name)
    elif config.btm.clusters:
      stages += [CLUSTERS, *map(cluster_stage, range(config.btm.clusters))]
  return stages + [EVAL] + ([EXPORT] if btx.export and btx.train_btx else [])


def _with_training(config: ExperimentConfig, stage: StageConfig) -> ExperimentConfig:
  """`config` with the stage's steps, learning rate and warmup where set."""
  steps = stage.steps or config.train.steps
  optimizer = dataclasses.replace(
      config.optimizer, learning_rate=stage.learning_rate or config.optimizer.learning_rate,
      warmup_steps=(stage.warmup_steps if stage.warmup_steps >= 0
                    else min(config.optimizer.warmup_steps, steps)))
  window = profile_window(config.profile_steps)  # traced only where the stage has those steps
  profile = config.profile_steps if window and window[1] <= steps else ""
  return dataclasses.replace(config, train=dataclasses.replace(config.train, steps=steps),
                             optimizer=optimizer, btx=BTXConfig(), profile_steps=profile)


def _dense(config: ExperimentConfig) -> ExperimentConfig:
  """`config` freezing nothing if its model is dense: `optimizer.freeze` names MoE
  parameters (experts, routers), so it applies to MoE stages (the BTX finetune)."""
  if config.model.moe is not None:
    return config
  return dataclasses.replace(config,
                             optimizer=dataclasses.replace(config.optimizer, freeze="none"))


def seed_config(config: ExperimentConfig) -> ExperimentConfig:
  """The seed stage: the experiment's model on its data, without the BTX settings."""
  return _dense(dataclasses.replace(config, btx=BTXConfig()))


def expert_config(config: ExperimentConfig, domain: str) -> ExperimentConfig:
  """Expert `domain`: the seed's model trained on that domain alone, its own schedule."""
  spec = dataclasses.replace(config.data.domains[domain], weight=1.0)
  data = dataclasses.replace(config.data, domains={domain: spec}, reweighting="none")
  return _dense(dataclasses.replace(_with_training(config, config.btx.experts[domain]),
                                    data=data))


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
  derived = _with_training(config, config.btx.finetune)
  return dataclasses.replace(derived, data=data, model=moe_model_config(config))


def btx_compute(config: ExperimentConfig) -> dict[str, float]:
  """BTX's training tokens and FLOPs: every expert's training plus the finetune."""
  return total_compute([*(compute(expert_config(config, d)) for d in config.btx.experts),
                        compute(finetune_config(config))])


def upcycle_model_config(config: ExperimentConfig) -> ModelConfig:
  """The upcycled MoE: the seed with `btx.moe` layers of as many experts as BTX mixes,
  each as wide as the seed's FFN, every `btx.upcycle_every` layers."""
  btx = config.btx
  moe = dataclasses.replace(btx.moe, n_experts=len(btx.expert_names), d_ff=None,
                            every=btx.upcycle_every)
  return dataclasses.replace(config.model, moe=moe)


def llama_moe_model_config(config: ExperimentConfig) -> ModelConfig:
  """The split seed: `llama_moe.moe` layers of the seed's neurons (`jbtx.btx.split`)."""
  llama_moe = config.llama_moe
  moe = llama_moe.moe
  shared = llama_moe.shared_experts if llama_moe.split == "sharing_inter" else 0
  width, _ = expert_width(config.model.d_ff, moe.n_experts, llama_moe.split,
                          llama_moe.shared_experts)
  scale = moe.n_experts / moe.top_k if llama_moe.scale_outputs else 1.0
  moe = dataclasses.replace(moe, d_ff=width, n_shared_experts=shared, output_scale=scale)
  return dataclasses.replace(config.model, moe=moe)


def olmoe_model_config(config: ExperimentConfig) -> ModelConfig:
  """OLMoE from scratch: the seed's decoder with QK-norm and `btx.olmoe` layers."""
  moe = config.btx.olmoe
  moe = dataclasses.replace(moe, d_ff=moe.d_ff or config.model.d_ff // moe.top_k)
  return dataclasses.replace(config.model, qk_norm=True, moe=moe)


def baseline_model_config(config: ExperimentConfig, name: str) -> ModelConfig:
  return {UPCYCLE: upcycle_model_config, LLAMA_MOE: llama_moe_model_config,
          OLMOE: olmoe_model_config}.get(name, lambda c: c.model)(config)


def baseline_config(config: ExperimentConfig, name: str,
                    references: dict[str, float] | None = None) -> ExperimentConfig:
  """Baseline `name` (one of TRAINED_BASELINES): its model trained on the finetune
  mixture with the finetune's schedule, for as many steps as match BTX's training
  FLOPs (to within one step's; OLMoE, from scratch, also gets the seed's).

  LLaMA-MoE with `llama_moe.reweighting = "loss"` re-weights its domains every
  `llama_moe.reweight_every` steps towards `references` (domain -> loss; a domain's
  `reference_loss` wins); without `references` the mixture stays static (the stage's
  identity, which the references derive from: the seed).
  """
  model = baseline_model_config(config, name)
  derived = dataclasses.replace(finetune_config(config), model=model)
  steps = matched_steps(config, model, with_seed=name == OLMOE)
  derived = _dense(_with_training(derived, dataclasses.replace(config.btx.finetune,
                                                               steps=steps)))
  if name != LLAMA_MOE or config.llama_moe.reweighting == "none" or references is None:
    return derived
  domains = {d: spec if spec.reference_loss is not None
             else dataclasses.replace(spec, reference_loss=references[d])
             for d, spec in derived.data.domains.items()}
  train = dataclasses.replace(derived.train, eval_every=config.llama_moe.reweight_every)
  return dataclasses.replace(derived, train=train, data=dataclasses.replace(
      derived.data, domains=domains, reweighting="loss"))


def matched_steps(config: ExperimentConfig, model: ModelConfig, with_seed: bool = False) -> int:
  """Steps of `model` on the finetune batches whose training FLOPs are BTX's (plus the
  seed's training with `with_seed`)."""
  data = config.data
  per_step = train_flops_per_token(model, data.seq_len) * data.batch_size * data.seq_len
  budget = btx_compute(config)["flops"] + (compute(seed_config(config))["flops"]
                                           if with_seed else 0.0)
  return max(1, round(budget / per_step))


def cluster_config(config: ExperimentConfig, index: int,
                   corpus: pathlib.Path) -> ExperimentConfig:
  """c-BTM's expert `index`: the seed trained on its cluster's documents (files in
  `corpus`, written by the clusters stage) with the finetune's schedule; the K experts
  together get BTX's training FLOPs (their steps differ by at most one)."""
  k = config.btm.clusters
  total = matched_steps(config, config.model)
  steps = max(1, total // k + (index < total % k))
  name = f"cluster{index}"
  domain = DomainConfig(source="files", splits={
      split: str(corpus / f"{index}.{split}.jsonl") for split in ("train", "validation")})
  data = dataclasses.replace(config.data, domains={name: domain}, reweighting="none")
  stage = dataclasses.replace(config.btx.finetune, steps=steps)
  return _dense(dataclasses.replace(_with_training(config, stage), data=data))


def eval_config(config: ExperimentConfig) -> ExperimentConfig:
  """Validation of every model on every domain (the weights do not matter there)."""
  domains = {name: dataclasses.replace(spec, weight=1.0) if spec.weight == 0 else spec
             for name, spec in config.data.domains.items()}
  return dataclasses.replace(config, data=dataclasses.replace(config.data, domains=domains))


def _mix_identity(config: ExperimentConfig) -> dict[str, Any]:
  btx = config.btx
  keys = ("seed_checkpoint", "experts", "seed_as_expert", "mix_weights", "ffn", "split_chunks",
          "router_init", "router_init_batches")
  return {"seed": config.seed, "model": to_dict(moe_model_config(config)),
          "btx": {k: _plain(getattr(btx, k)) for k in keys},
          **({"data": to_dict(config.data)} if btx.router_init == "hidden" else {})}


def _plain(value: Any) -> Any:
  if isinstance(value, dict):
    return {k: _plain(v) for k, v in value.items()}
  return to_dict(value) if dataclasses.is_dataclass(value) else value


def _training_identity(config: ExperimentConfig) -> dict[str, Any]:
  """A derived training stage's settings (the method groups, which the training engine
  does not read, left out: a stage that depends on one adds it)."""
  return {k: v for k, v in to_dict(config).items() if k not in ("btx", "btm", "llama_moe", "eval")}


def stage_identity(config: ExperimentConfig, stage: str) -> dict[str, Any]:
  """What `stage`'s output depends on, as a flat {dotted key: value} dict."""
  seed = ({"btx.seed_checkpoint": config.btx.seed_checkpoint} if config.btx.seed_checkpoint
          else _training_identity(seed_config(config)))
  if stage == SEED:
    tree = seed
  elif stage.startswith(EXPERT_PREFIX):
    tree = (_training_identity(expert_config(config, stage.removeprefix(EXPERT_PREFIX)))
            | {"from_seed": seed})
  elif stage == MIX:
    tree = _mix_identity(config)
  elif stage == FINETUNE:
    tree = _training_identity(finetune_config(config)) | {"mix": _mix_identity(config)}
  elif stage in TRAINED_BASELINES:
    tree = _training_identity(baseline_config(config, stage))
    if stage == LLAMA_MOE:
      tree["llama_moe"] = to_dict(config.llama_moe)
    if stage != OLMOE:
      tree["from_seed"] = seed
  elif stage == CLUSTERS:
    tree = _clusters_identity(config)
  elif stage.startswith(CLUSTER_PREFIX):
    index = int(stage.removeprefix(CLUSTER_PREFIX))
    tree = (_training_identity(cluster_config(config, index, pathlib.Path(CLUSTERS)))
            | {"from_seed": seed, "clusters": _clusters_identity(config)})
  elif stage == EXPORT:
    tree = {"finetune": stage_identity(config, FINETUNE)}
  else:  # eval depends on every model it evaluates
    btx = config.btx
    tree = {name: stage_identity(config, name) for name in stage_names(config)
            if name not in (EVAL, EXPORT)}
    tree |= {"btx": {"task_examples": btx.task_examples, "task_max_tokens": btx.task_max_tokens,
                     "baselines": list(btx.baselines), "train_btx": btx.train_btx},
             "train.eval_batches": config.train.eval_batches, "eval": to_dict(config.eval)}
    if BTM in btx.baselines:
      tree["btm"] = to_dict(config.btm)
  return {k: v for k, v in _flatten(tree).items() if not _run_only(k)}


def _run_only(key: str) -> bool:
  """Whether the dotted `key` (or its tail after a nested stage's prefix) is run-only."""
  parts = key.split(".")
  tails = (".".join(parts[i:]) for i in range(len(parts)))
  return any(t in _RUN_ONLY_KEYS or t.startswith(_RUN_ONLY_GROUPS) for t in tails)


def _clusters_identity(config: ExperimentConfig) -> dict[str, Any]:
  btm = config.btm
  return {"seed": config.seed, "data": to_dict(finetune_config(config).data),
          "btm": {k: getattr(btm, k) for k in ("clusters", "cluster_documents",
                                               "tfidf_features")}}


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    path = f"{prefix}{key}"
    if isinstance(value, dict) and value:
      flat |= _flatten(value, f"{path}.")
    else:
      flat[path] = value
  return flat


def identity_differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
  """The dotted keys whose values differ (or exist on one side only), sorted."""
  keys = set(recorded) | set(current)
  return sorted(k for k in keys if recorded.get(k, "<unset>") != _json(current.get(k, "<unset>")))


def _json(value: Any) -> Any:
  """`value` as it reads back from JSON (tuples become lists)."""
  if isinstance(value, tuple):
    return [_json(v) for v in value]
  return value


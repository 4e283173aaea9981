"""Branch-Train-Merge (`btx.baselines` lists "btm"): BTX's experts kept apart, ensembled
under the domain posterior and averaged (`jbtx.eval.ensembles`); with `btm.clusters` =
K, c-BTM: stage `clusters` splits the finetune mixture's documents by balanced k-means
on tf-idf (`jbtx.pipeline.clusters`), stages `cluster/0 … cluster/K-1` train one expert
each from the seed, together BTX's training FLOPs."""

from __future__ import annotations

import pathlib
from typing import Any

import jax

from jbtx.config import ConfigError, ExperimentConfig
from jbtx.eval import ensembles
from jbtx.eval.table import summarise
from jbtx.pipeline import budgets, experiments, identity
from jbtx.pipeline.clusters import SUMMARY_FILE, cluster_config, load_clusters, write_clusters
from jbtx.pipeline.registry import Stage, register
from jbtx.pipeline.stages.expert import expert_stages
from jbtx.pipeline.stages.seed import SEED, seed_identity, seed_params
from jbtx.pipeline.workdir import Paths, recorded_compute
from jbtx.runtime.signals import StopSignal
from jbtx.training.loop import train_stage

BTM = "btm"
CLUSTERS = "clusters"
CLUSTER_PREFIX = "cluster/"


def cluster_stage(index: int) -> str:
  return f"{CLUSTER_PREFIX}{index}"


def _clusters_identity(config: ExperimentConfig) -> dict[str, Any]:
  btm = config.btm
  return {"seed": config.seed, "data": identity.plain(experiments.finetune_config(config).data),
          "btm": {k: getattr(btm, k) for k in ("clusters", "cluster_documents",
                                               "tfidf_features")}}


def _index(stage: str) -> int:
  return int(stage.removeprefix(CLUSTER_PREFIX))


@register
class BranchTrainMerge(Stage):
  """BTM's rows (no stage of its own), or c-BTM's clusters and cluster experts."""

  name = BTM
  phase = 30
  row_order = 20
  baseline = True

  def _listed(self, config: ExperimentConfig) -> bool:
    return bool(config.btx.experts) and BTM in config.btx.baselines

  def stages(self, config: ExperimentConfig) -> list[str]:
    k = config.btm.clusters
    if not self._listed(config) or not k:
      return []
    return [CLUSTERS, *(cluster_stage(i) for i in range(k))]

  def wanted(self, config: ExperimentConfig) -> list[str]:
    if not self._listed(config):
      return []
    return self.stages(config) if config.btm.clusters else expert_stages(config)

  def inputs(self, config: ExperimentConfig, stage: str) -> list[str]:
    return [] if stage == CLUSTERS else [SEED, CLUSTERS]

  def experiment(self, config: ExperimentConfig, stage: str) -> ExperimentConfig | None:
    if stage == CLUSTERS:
      return None
    return cluster_config(config, _index(stage), pathlib.Path(CLUSTERS))

  def identity(self, config: ExperimentConfig, stage: str) -> dict[str, Any]:
    if stage == CLUSTERS:
      return _clusters_identity(config)
    return (identity.training(self.experiment(config, stage))
            | {"from_seed": seed_identity(config), "clusters": _clusters_identity(config)})

  def validate(self, config: ExperimentConfig) -> None:
    """The ensemble's top-k against its members (c-BTM's clusters or the experts)."""
    if not self._listed(config):
      return
    members = config.btm.clusters or len(config.btx.expert_names)
    for k in config.btm.top_k:
      if k > members:
        raise ConfigError("btm.top_k", f"{k} exceeds the ensemble's {members} experts, "
                          f"got {config.btm.top_k}")

  def run(self, config: ExperimentConfig, paths: Paths, stop: StopSignal, stage: str) -> None:
    if stage == CLUSTERS:  # short; a signal stops the run after it
      if jax.process_index() == 0:
        write_clusters(config, paths.stage_dir(CLUSTERS))
      return
    derived = cluster_config(config, _index(stage), paths.stage_dir(CLUSTERS))
    train_stage(derived, paths.stage_dir(stage), stage, stop,
                initial_params=seed_params(config, paths),
                facts={"compute": budgets.compute(derived)})

  def done(self, paths: Paths, stage: str) -> bool:
    if stage == CLUSTERS:
      return (paths.stage_dir(CLUSTERS) / SUMMARY_FILE).is_file()
    return super().done(paths, stage)

  def ensembles(self, config: ExperimentConfig) -> list[str]:
    if not self._listed(config):
      return []
    return self.stages(config) if config.btm.clusters else [SEED, *expert_stages(config)]

  def evaluate_ensembles(self, config: ExperimentConfig, paths: Paths) -> dict[str, Any]:
    """The BTM (or c-BTM) rows, each with its members' training compute."""
    if config.btm.clusters:
      members = [paths.stage_dir(cluster_stage(i)) for i in range(config.btm.clusters)]
      clusters = load_clusters(paths.stage_dir(CLUSTERS))
      rows = ensembles.cbtm_rows(config, members, clusters)
      compute = budgets.total_compute([recorded_compute(d) for d in members])
    else:
      names = config.btx.expert_names
      rows = ensembles.btm_rows(config, {n: paths.model_dir(n) for n in names})
      compute = budgets.total_compute([recorded_compute(paths.model_dir(n))
                                       for n in config.btx.experts])
    return {name: summarise(row, compute) for name, row in rows.items()}

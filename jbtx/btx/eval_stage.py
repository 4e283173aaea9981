"""The eval stage, shared with `python -m jbtx.eval`: every model of a workdir scored.

Rows, by name: the seed, each expert (by domain), the BTM ensembles and averages, the
trained baselines (upcycle, dense, llama_moe, olmoe) and btx (the finetuned MoE). Each
row has per-domain loss and perplexity, task accuracies (`jbtx.btx.results`) and its
training compute. MoE rows also get routing statistics and plots in `eval/<row>/`
(`jbtx.eval.routing`, `jbtx.eval.plots`).
"""

from __future__ import annotations

import pathlib
import time
from collections.abc import Sequence
from typing import Any

import jax
import tqdm

from jbtx import checkpoint, files
from jbtx.btx import btm_eval, stages
from jbtx.btx import workdir as workdir_lib
from jbtx.btx.clusters import TfidfClusters
from jbtx.btx.results import evaluate_model, summarise, table
from jbtx.btx.workdir import Paths
from jbtx.config import ConfigError, ExperimentConfig
from jbtx.config.btx import SEED_EXPERT
from jbtx.data import pipeline as data_pipeline
from jbtx.eval import plots
from jbtx.eval import routing as routing_analysis
from jbtx.models.llama import Llama
from jbtx.training.guards import StopSignal
from jbtx.training.loop import Preempted, log, total_compute

BTM_ROWS = "btm"  # the name that selects every BTM (or c-BTM) row
COMPUTE_NOTE = (
    "training FLOPs of the row's own stages (6·active params·tokens plus attention); btx = "
    "its experts' training plus the finetune; btm = its experts' training (no finetune); "
    "upcycle, dense, llama_moe and c-btm's cluster experts are trained for as many FLOPs "
    "as btx, olmoe (from scratch) for btx's plus the seed's; the seed's row is the seed's "
    "training, shared by every row but olmoe")


def stage_compute(directory: pathlib.Path) -> dict[str, float]:
  """The training compute a checkpoint records (`{"tokens", "flops"}`)."""
  metrics = checkpoint.read_record(directory).get("metrics", {})
  return metrics.get("compute", {"tokens": 0, "flops": 0.0})


def checkpoint_rows(config: ExperimentConfig, paths: Paths) -> dict[str, pathlib.Path]:
  """The checkpoints evaluated, by row name: the seed, the experts, BTX, the baselines."""
  models = {SEED_EXPERT: paths.model_dir(SEED_EXPERT)} if stages.uses_seed(config) else {}
  if stages.uses_domain_experts(config):
    models |= {name: paths.model_dir(name) for name in config.btx.experts}
  if config.btx.train_btx:
    models["btx"] = paths.stage_dir(stages.FINETUNE)
  return models | {name: paths.stage_dir(name) for name in config.btx.baselines
                   if name != stages.BTM}


def row_names(config: ExperimentConfig) -> list[str]:
  """Every row name `evaluate_rows` accepts (BTM's rows as one, "btm")."""
  names = list(checkpoint_rows(config, Paths(config, pathlib.Path("."))))
  return names + ([BTM_ROWS] if stages.BTM in config.btx.baselines else [])


def row_of(config: ExperimentConfig, stage: str) -> str:
  """The row named by `stage`: a row name, or the stage that trains it ("finetune" for
  btx, "expert/<domain>" for an expert). ConfigError listing the choices otherwise."""
  name = {stages.FINETUNE: "btx"}.get(stage, stage.removeprefix(stages.EXPERT_PREFIX))
  choices = row_names(config)
  if name not in choices:
    raise ConfigError("stage", f"{stage!r} is not a model of this experiment; choose one "
                      f"of {', '.join(choices)} (or finetune for btx)")
  return name


def _btm_rows(config: ExperimentConfig, paths: Paths) -> dict[str, dict[str, Any]]:
  """The BTM (or c-BTM) rows, each with its members' training compute."""
  if config.btm.clusters:
    members = [paths.stage_dir(stages.cluster_stage(i)) for i in range(config.btm.clusters)]
    clusters = TfidfClusters.load(paths.stage_dir(stages.CLUSTERS))
    rows = btm_eval.cbtm_rows(config, members, clusters)
    compute = total_compute([stage_compute(d) for d in members])
  else:
    names = config.btx.expert_names
    rows = btm_eval.btm_rows(config, {n: paths.model_dir(n) for n in names})
    compute = total_compute([stage_compute(paths.model_dir(n)) for n in config.btx.experts])
  return {name: summarise(row, compute) for name, row in rows.items()}


def sample_texts(config: ExperimentConfig, length: int = 160) -> dict[str, str]:
  """Each domain's first validation document, cut to `length` characters: the texts
  whose tokens the routing plots colour by expert."""
  return {d: data_pipeline.open_source(config.data, d, "validation")[0][:length]
          for d in config.data.domains}


def analyse_routing(config: ExperimentConfig, paths: Paths, name: str,
                    directory: pathlib.Path) -> None:
  """Routing statistics and plots of an MoE row on the validation batches, in
  `eval/<name>/`; for BTX, how often each domain's tokens pick its own expert."""
  model_config = checkpoint.load_config(directory)
  if model_config.moe is None or model_config.moe.routing == "expert_choice":
    return
  model = Llama(model_config)
  params = checkpoint.load_params_for(directory, model_config)
  statistics = routing_analysis.domain_statistics(model, params, config.data, "validation",
                                                  config.train.eval_batches)
  experts = (list(config.btx.expert_names) if name == "btx" and config.btx.ffn == "experts"
             else None)
  if jax.process_index() == 0:
    out = paths.stage_dir(stages.EVAL) / name
    routing_analysis.save_statistics(statistics, out)
    tokenizer = data_pipeline.make_tokenizer(config.data)
    tokens = {d: routing_analysis.token_experts(model, params, tokenizer, text)
              for d, text in sample_texts(config).items()}
    written = plots.save_routing_plots(statistics, tokens, tokenizer, out, name, experts)
    log(f"[eval] {name}: routing statistics and {len(written)} plots in {out}")
  if experts:
    shares = routing_analysis.own_expert_share(statistics, experts)
    log("[eval] btx: share of each domain's tokens whose top-1 expert is its own, by layer: "
        + "; ".join(f"{d} " + " ".join(f"{v:.2f}" for v in share)
                    for d, share in shares.items()))


def evaluate_rows(config: ExperimentConfig, paths: Paths, names: Sequence[str] | None = None,
                  stop: StopSignal | None = None) -> dict[str, dict[str, Any]]:
  """The rows `names` (None = all, `row_names`) of the workdir, in the table's order
  (seed, experts, BTM, upcycle, dense, llama_moe, olmoe, BTX); `config` is the eval
  stage's (`stages.eval_config`)."""
  names = row_names(config) if names is None else list(names)
  models = {n: d for n, d in checkpoint_rows(config, paths).items() if n in names}
  compute = {name: stage_compute(d) for name, d in models.items()}
  if "btx" in models:
    compute["btx"] = total_compute([*(stage_compute(paths.model_dir(n))
                                      for n in config.btx.experts), compute["btx"]])
  rows = {}
  for name, directory in tqdm.tqdm(models.items(), desc="models", unit="model",
                                   disable=None if len(models) > 1 else True):
    began = time.perf_counter()
    rows[name] = summarise(evaluate_model(config, directory), compute[name])
    log(f"[eval] {name}: {directory} ({time.perf_counter() - began:.1f} s)")
    if stop is not None and stop.requested():
      raise Preempted(stages.EVAL)
  for name, directory in models.items():
    analyse_routing(config, paths, name, directory)
  if BTM_ROWS in names:
    began = time.perf_counter()
    rows |= _btm_rows(config, paths)
    log(f"[eval] {'c-btm' if config.btm.clusters else 'btm'}: ensembles and averages "
        f"({time.perf_counter() - began:.1f} s)")
  last = [*stages.TRAINED_BASELINES, "btx"]
  order = [n for n in rows if n not in last] + last
  return {n: rows[n] for n in order if n in rows}


def write_results(rows: dict[str, dict[str, Any]], path: pathlib.Path) -> None:
  """`{"rows", "notes"}` as JSON at `path` (process 0, atomically)."""
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_json(path, {"rows": rows, "notes": {"compute": COMPUTE_NOTE}})


def run_eval(config: ExperimentConfig, paths: Paths, stop: StopSignal) -> None:
  """Evaluates the seed, every expert, the BTX model and the baselines; writes
  results.json and prints the table."""
  rows = evaluate_rows(stages.eval_config(config), paths, stop=stop)
  write_results(rows, paths.workdir / workdir_lib.RESULTS_FILE)
  log(table(rows))

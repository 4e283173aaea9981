"""The eval stage, shared with `python -m jbtx.eval`: every model of a workdir scored.

Rows, by name, in the order of their kinds (`Stage.row_order`): the seed, each expert
(by domain), the BTM ensembles and averages, the trained baselines (upcycle, dense,
llama_moe, olmoe) and btx (the finetuned MoE). Each row has per-domain loss and
perplexity, task accuracies (`jbtx.eval.scoring`) and its training compute. MoE rows
also get routing statistics and plots in `eval/<row>/` (`jbtx.eval.routing_analysis`,
`jbtx.eval.plots`). The stage writes `results.json`; a changed evaluation runs again.
"""

from __future__ import annotations

import pathlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import tqdm

from jbtx.config import ConfigError, ExperimentConfig
from jbtx.config.btx import SEED_EXPERT
from jbtx.data import loader
from jbtx.eval import plots
from jbtx.eval import routing_analysis as analysis
from jbtx.eval.curve_plot import save_curves
from jbtx.eval.scoring import evaluate_model
from jbtx.eval.table import summarise, table, write_results
from jbtx.interop import checkpoint
from jbtx.models.llama import Llama
from jbtx.pipeline import budgets, curves, experiments, registry, workdir
from jbtx.pipeline.identity import plain
from jbtx.pipeline.registry import Stage, register
from jbtx.pipeline.workdir import Paths, recorded_compute
from jbtx.runtime.distributed import log
from jbtx.runtime.signals import Preempted, StopSignal

EVAL = "eval"
RESULTS_FILE = "results.json"
CURVES_FILE = "curves.png"
COMPUTE_NOTE = (
    "training FLOPs of the row's own stages (6·active params·tokens plus attention); btx = "
    "its experts' training plus the finetune; btm = its experts' training (no finetune); "
    "upcycle, dense, llama_moe and c-btm's cluster experts are trained for as many FLOPs "
    "as btx, olmoe (from scratch) for btx's plus the seed's; the seed's row is the seed's "
    "training, shared by every row but olmoe")


def checkpoint_rows(config: ExperimentConfig) -> dict[str, tuple[Stage, str]]:
  """The rows that are one checkpoint each, in table order: row -> (kind, stage)."""
  names = set(registry.stage_names(config))
  rows = [(kind.row_order, row, kind, stage) for kind in registry.kinds(config)
          for row, stage in kind.rows(config).items() if stage in names]
  return {row: (kind, stage) for _, row, kind, stage in sorted(rows, key=lambda r: r[0])}


def ensemble_kinds(config: ExperimentConfig) -> list[Stage]:
  """The kinds whose rows combine checkpoints (BTM's), by their name."""
  return [kind for kind in registry.kinds(config) if kind.ensembles(config)]


def row_names(config: ExperimentConfig) -> list[str]:
  """Every row name `evaluate_rows` accepts (a kind of ensembles by its name, "btm")."""
  return list(checkpoint_rows(config)) + [kind.name for kind in ensemble_kinds(config)]


def row_of(config: ExperimentConfig, stage: str) -> str:
  """The row named by `stage`: a row name, or the stage of a checkpoint row ("finetune"
  for btx, "expert/<domain>" for an expert). ConfigError listing the choices otherwise."""
  by_stage = {s: row for row, (_, s) in checkpoint_rows(config).items()}
  choices = row_names(config)
  name = stage if stage in choices else by_stage.get(stage)
  if name is None:
    raise ConfigError("stage", f"{stage!r} is not a model of this experiment; choose one "
                      f"of {', '.join(choices)} (or the stage that trains it, e.g. "
                      f"{', '.join(by_stage)})")
  return name


def required_stages(config: ExperimentConfig, row: str) -> list[str]:
  """The stages whose outputs row `row` reads."""
  rows = checkpoint_rows(config)
  if row in rows:
    return [rows[row][1]]
  return next(k.ensembles(config) for k in ensemble_kinds(config) if k.name == row)


def sample_texts(config: ExperimentConfig, length: int = 160) -> dict[str, str]:
  """Each domain's first validation document, cut to `length` characters: the texts
  whose tokens the routing plots colour by expert."""
  return {d: loader.open_source(config.data, d, "validation")[0][:length]
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
  statistics = analysis.domain_statistics(model, params, config.data, "validation",
                                          config.train.eval_batches)
  experts = (list(config.btx.expert_names) if name == "btx" and config.btx.ffn == "experts"
             else None)
  if jax.process_index() == 0:
    out = paths.workdir / EVAL / name
    analysis.save_statistics(statistics, out)
    tokenizer = loader.make_tokenizer(config.data)
    tokens = {d: analysis.token_experts(model, params, tokenizer, text)
              for d, text in sample_texts(config).items()}
    written = plots.save_routing_plots(statistics, tokens, tokenizer, out, name, experts)
    log(f"[eval] {name}: routing statistics and {len(written)} plots in {out}")
  if experts:
    shares = analysis.own_expert_share(statistics, experts)
    log("[eval] btx: share of each domain's tokens whose top-1 expert is its own, by layer: "
        + "; ".join(f"{d} " + " ".join(f"{v:.2f}" for v in share)
                    for d, share in shares.items()))


def evaluate_rows(config: ExperimentConfig, paths: Paths, names: Sequence[str] | None = None,
                  stop: StopSignal | None = None) -> dict[str, dict[str, Any]]:
  """The rows `names` (None = all, `row_names`) of the workdir, in table order; `config`
  is the eval stage's (`experiments.eval_config`)."""
  names = row_names(config) if names is None else list(names)
  models = {row: (kind, stage) for row, (kind, stage) in checkpoint_rows(config).items()
            if row in names}
  rows = {}
  for row, (kind, stage) in tqdm.tqdm(models.items(), desc="models", unit="model",
                                      disable=None if len(models) > 1 else True):
    began, directory = time.perf_counter(), kind.output(paths, stage)
    compute = budgets.total_compute([recorded_compute(kind.output(paths, s))
                                     for s in kind.row_training(config, row)])
    rows[row] = summarise(evaluate_model(config, directory), compute)
    rows[row]["curve"] = curves.row_curve(kind.row_training(config, row),
                                          lambda s, kind=kind: kind.output(paths, s))
    log(f"[eval] {row}: {directory} ({time.perf_counter() - began:.1f} s)")
    if stop is not None and stop.requested():
      raise Preempted(EVAL)
  for row, (kind, stage) in models.items():
    analyse_routing(config, paths, row, kind.output(paths, stage))
  placed = [(models[row][0].row_order, {row: value}) for row, value in rows.items()]
  for kind in ensemble_kinds(config):
    if kind.name in names:
      began = time.perf_counter()
      ensembles = kind.evaluate_ensembles(config, paths)
      placed.append((kind.row_order, {name: row | {"curve": curves.ensemble_point(row)}
                                      for name, row in ensembles.items()}))
      log(f"[eval] {kind.name}: ensembles and averages ({time.perf_counter() - began:.1f} s)")
  # In table order: by the kinds' row order, checkpoint rows before ensembles at a tie.
  return {row: value for _, group in sorted(placed, key=lambda p: p[0])
          for row, value in group.items()}


@register
class Evaluation(Stage):
  """`results.json` and `eval/<row>/`: every model of the run on every domain."""

  name = EVAL
  phase = 40
  reruns_when_changed = True
  reads_earlier_stages = True

  def stages(self, config: ExperimentConfig) -> list[str]:
    return [EVAL] if config.btx.experts else []

  def wanted(self, config: ExperimentConfig) -> list[str]:
    return self.stages(config)

  def identity(self, config: ExperimentConfig, stage: str) -> dict[str, Any]:
    """Every model it evaluates, and the evaluation's settings."""
    btx = config.btx
    tree = {name: workdir.stage_identity(config, name)
            for name in registry.inputs(config, stage)}
    tree |= {"btx": {"task_examples": btx.task_examples, "task_max_tokens": btx.task_max_tokens,
                     "baselines": list(btx.baselines), "train_btx": btx.train_btx},
             "train.eval_batches": config.train.eval_batches, "eval": plain(config.eval)}
    if "btm" in btx.baselines:
      tree["btm"] = plain(config.btm)
    return tree

  def done(self, paths: Paths, stage: str) -> bool:
    return (paths.workdir / RESULTS_FILE).is_file()

  def set_aside(self, paths: Paths, stage: str) -> None:
    results = paths.workdir / RESULTS_FILE
    results.rename(results.with_suffix(".json.old"))

  def run(self, config: ExperimentConfig, paths: Paths, stop: StopSignal, stage: str) -> None:
    """Evaluates every row; writes results.json and prints the table."""
    rows = evaluate_rows(experiments.eval_config(config), paths, stop=stop)
    write_results(rows, paths.workdir / RESULTS_FILE, {"compute": COMPUTE_NOTE,
                                                       "curve": curves.NOTE})
    if jax.process_index() == 0:
      written = save_curves({name: row["curve"] for name, row in rows.items()},
                            methods(config, rows), SEED_EXPERT if SEED_EXPERT in rows else None,
                            paths.workdir / EVAL / CURVES_FILE)
      log(f"[eval] validation loss against training FLOPs: {written}")
    log(table(rows))


def methods(config: ExperimentConfig, rows: Mapping[str, Any]) -> list[str]:
  """The rows that are methods (not the seed or an expert), in table order."""
  ingredients = {SEED_EXPERT, *config.btx.experts}
  return [name for name in rows if name not in ingredients]


def evaluate_workdir(config: ExperimentConfig, workdir_path: pathlib.Path, stage: str | None,
                     output: pathlib.Path | None) -> pathlib.Path:
  """`python -m jbtx.eval`: `stage`'s model (None = all) of a finished workdir, scored
  by the eval stage's code; returns the results' path (default
  `eval/results.<stage>.json`), leaving the pipeline's results.json alone."""
  paths = Paths(config, workdir_path)
  registry.validate(config)
  rows = [row_of(config, stage)] if stage else row_names(config)
  missing = sorted({s for r in rows for s in required_stages(config, r)
                    if not paths.complete(s)})
  if missing:
    raise ConfigError("stage", f"{', '.join(missing)} not complete in {workdir_path}: "
                      "finish the run first (python -m jbtx.train with the same config "
                      "and --workdir)")
  results = evaluate_rows(experiments.eval_config(config), paths, rows)
  output = output or workdir_path / EVAL / f"results.{stage or 'all'}.json".replace("/", "_")
  write_results(results, output, {"compute": COMPUTE_NOTE})
  print(table(results))
  return output

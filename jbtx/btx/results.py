"""The eval stage: every model of the run on every domain, and the results table.

For each model (the seed, each expert, the final BTX model): validation loss and
perplexity per domain (`train.eval_batches` batches each, as training reports them),
exact-match accuracy on the demo tasks of the domains that have them (math,
knowledge; greedy decoding with the KV cache, `btx.task_examples` validation items),
and the training compute behind it. Written to `workdir/results.json`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from jbtx import checkpoint, parallel
from jbtx.config import ExperimentConfig
from jbtx.data import demo, pipeline
from jbtx.eval.tasks import exact_match
from jbtx.models.llama import Llama, abstract_params
from jbtx.training.evaluation import evaluate, host_params
from jbtx.training.step import make_eval_step


def task_domains(config: ExperimentConfig) -> list[str]:
  """The domains whose exact-match tasks are scored: demo math and knowledge."""
  return [name for name, spec in config.data.domains.items()
          if spec.source == "demo" and spec.name in demo.TASK_DOMAINS]


def spec_name(config: ExperimentConfig, domain: str) -> str:
  """The demo domain behind the data domain `domain` (its tasks' kind)."""
  return config.data.domains[domain].name


def evaluate_model(config: ExperimentConfig, directory: Any) -> dict[str, Any]:
  """Per-domain loss/perplexity and task accuracy of the checkpoint at `directory`."""
  model_config = checkpoint.load_config(directory)
  model = Llama(model_config)
  mesh = parallel.make_mesh(config.mesh)
  params = checkpoint.load_params_for(directory, model_config)
  params = jax.device_put(params, parallel.param_shardings(abstract_params(model), mesh))
  validation = evaluate(params, config, mesh, make_eval_step(model, mesh))
  tasks = {}
  if config.btx.task_examples:
    tokenizer = pipeline.make_tokenizer(config.data)
    local = host_params(params)
    for domain in task_domains(config):
      items = pipeline.eval_tasks(config.data, domain, "validation")[:config.btx.task_examples]
      tasks[domain] = exact_match(model, local, tokenizer, items,
                                  config.btx.task_max_tokens[spec_name(config, domain)],
                                  batch_size=len(items))
  return {"domains": {d: {"loss": loss, "perplexity": math.exp(loss)}
                      for d, loss in validation["domains"].items()},
          "tasks": tasks}


def summarise(row: dict[str, Any], compute: Mapping[str, float]) -> dict[str, Any]:
  """`row` with its averages (over domains and tasks) and its training compute."""
  losses = [v["loss"] for v in row["domains"].values()]
  accuracies = [v["accuracy"] for v in row["tasks"].values()]
  average = {"loss": float(np.mean(losses)), "perplexity": math.exp(float(np.mean(losses)))}
  if accuracies:
    average["accuracy"] = float(np.mean(accuracies))
  return row | {"average": average, "compute": dict(compute)}


def table(rows: Mapping[str, Mapping[str, Any]]) -> str:
  """The results as a fixed-width text table: perplexity per domain, task accuracy,
  average perplexity and accuracy, training FLOPs."""
  first = next(iter(rows.values()))
  domains, tasks = list(first["domains"]), list(first["tasks"])
  header = (["model"] + [f"ppl {d}" for d in domains] + [f"acc {t}" for t in tasks]
            + ["avg ppl"] + (["avg acc"] if tasks else []) + ["train FLOPs"])
  lines = [header]
  for name, row in rows.items():
    cells = [name] + [f"{row['domains'][d]['perplexity']:.3f}" for d in domains]
    cells += [f"{row['tasks'][t]['accuracy']:.3f}" for t in tasks]
    cells += [f"{row['average']['perplexity']:.3f}"]
    cells += [f"{row['average']['accuracy']:.3f}"] if tasks else []
    cells += [f"{row['compute']['flops']:.3e}"]
    lines.append(cells)
  widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
  return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w)
                             for i, (c, w) in enumerate(zip(line, widths, strict=True)))
                   for line in lines)


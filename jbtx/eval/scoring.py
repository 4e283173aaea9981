"""Scoring one model: what a row of the results table holds.

    row = evaluate_model(config, "runs/btx/finetune")
    row["domains"]["math"]["perplexity"], row["tasks"]["math"]["accuracy"]

Validation loss and perplexity per domain (`train.eval_batches` batches each, as
training reports them), exact-match accuracy on the demo tasks of the domains that have
them (math, knowledge; greedy decoding with the KV cache, `btx.task_examples`
validation items) and the task files of `eval.tasks` (exact match or log-likelihood
multiple choice, `jbtx.eval.task_files`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax

from jbtx.config import ConfigError, ExperimentConfig, ModelConfig
from jbtx.data import demo, loader
from jbtx.eval.task_files import TaskFile, TaskFileError, load_task_file
from jbtx.eval.tasks import multiple_choice, score_tasks
from jbtx.inference.likelihood import Score, make_scorer
from jbtx.inference.sharded import make_generator
from jbtx.interop import checkpoint
from jbtx.models.llama import Llama, abstract_params
from jbtx.runtime import sharding
from jbtx.training.step import make_eval_step
from jbtx.training.validation import domain_loss


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
  return evaluate_params(config, model_config,
                         checkpoint.load_params_for(directory, model_config))


def evaluate_params(config: ExperimentConfig, model_config: ModelConfig, params: Any,
                    domains: Sequence[str] | None = None) -> dict[str, Any]:
  """Loss/perplexity on `domains` (None = all) and accuracy on their demo tasks, of
  `params` (a host tree), sharded over `config.mesh` as training shards them; with all
  domains, also the tasks of `eval.tasks`."""
  model = Llama(model_config)
  mesh = sharding.make_mesh(config.mesh)
  params = jax.device_put(params, sharding.param_shardings(abstract_params(model), mesh))
  every_domain = domains is None
  domains = list(config.data.domains) if every_domain else list(domains)
  eval_step = _eval_step(model_config, mesh, config.optimizer.grad_accum_steps)
  losses = {}
  for domain in domains:
    total, count = domain_loss(params, config, mesh, eval_step, domain)
    losses[domain] = total / count
  tasks = {}
  generate = None
  if config.btx.task_examples or config.eval.tasks:
    generate = make_generator(model, params, mesh)
  if config.btx.task_examples:
    for domain in [d for d in task_domains(config) if d in domains]:
      tasks[domain] = score_tasks_of(config, domain, generate)
  if config.eval.tasks and every_domain:
    tasks |= score_task_files(config, task_files(config), generate,
                              make_scorer(model, params, mesh), model_config.max_seq_len)
  return {"domains": {d: {"loss": loss, "perplexity": math.exp(loss)}
                      for d, loss in losses.items()},
          "tasks": tasks}


@functools.lru_cache(maxsize=16)
def _eval_step(model_config: ModelConfig, mesh: Any, micro_batches: int) -> Any:
  """One compiled evaluation step per model shape and mesh, shared by every model of
  that shape the stage evaluates (the seed, the experts, BTM's averages, …)."""
  return make_eval_step(Llama(model_config), mesh, micro_batches)


def score_tasks_of(config: ExperimentConfig, domain: str, generate: Any) -> dict[str, Any]:
  """Exact match of `generate` on the first `btx.task_examples` validation tasks of
  `domain`, in one batch."""
  items = loader.eval_tasks(config.data, domain, "validation")[:config.btx.task_examples]
  return score_tasks(generate, loader.make_tokenizer(config.data), items,
                     config.btx.task_max_tokens[spec_name(config, domain)],
                     batch_size=len(items))


def task_files(config: ExperimentConfig) -> list[TaskFile]:
  """The tasks of `eval.tasks`, read and checked (ConfigError naming the key)."""
  tasks = []
  for path in config.eval.tasks:
    try:
      task = load_task_file(path, config.eval.max_examples)
    except TaskFileError as e:
      raise ConfigError("eval.tasks", str(e)) from None
    if task.name in task_domains(config):
      raise ConfigError("eval.tasks", f"{path} would be named {task.name!r}, the name of "
                        "a built-in demo task; rename the file")
    tasks.append(task)
  return tasks


def batch_rows(config: ExperimentConfig, mesh: Any) -> int:
  """`eval.batch_size` rounded up to split over the mesh's batch shards."""
  shards = sharding.batch_shards(mesh)
  return -(-config.eval.batch_size // shards) * shards


def score_task_files(config: ExperimentConfig, tasks: Sequence[TaskFile], generate: Any,
                     score: Score, max_len: int) -> dict[str, Any]:
  """Task name -> result of each of `tasks` (`task_files`): exact match with `generate`
  (as `score_tasks` takes it), multiple choice with `score`."""
  tokenizer = loader.make_tokenizer(config.data)
  mesh = sharding.make_mesh(config.mesh)
  results = {}
  for task in tasks:
    if task.kind == "exact_match":
      results[task.name] = score_tasks(generate, tokenizer, task.items,
                                       config.eval.max_new_tokens, config.eval.batch_size)
    else:
      results[task.name] = multiple_choice(score, tokenizer, task.items,
                                           batch_rows(config, mesh), max_len)
  return results

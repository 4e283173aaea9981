"""Every compiled step of an experiment, compiled ahead of time for a set of devices,
and whether each fits in their memory (`python -m jbtx.compile`).

    jobs = compile_jobs(config)                      # the steps the stages run
    for job in jobs: report = compile_job(job, devices)

The jobs are the training step of every training stage (the seed, the experts, the
finetune, each baseline, c-BTM's cluster experts: stages of one shape share a job) and
the eval step it validates with,
the router initialisation from hidden states (`btx.router_init = "hidden"`), and the
evaluation's steps: each scored model's eval step, its generation when the evaluation
decodes, and BTM's ensemble decoding. Each is built exactly as its stage builds it
(`jbtx.training.compilation`), sharded over the experiment's mesh.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import jax

from jbtx.config import BTXConfig, ExperimentConfig, ModelConfig, to_dict
from jbtx.eval.ensembles import ensemble_decoder
from jbtx.eval.scoring import task_domains
from jbtx.inference.sharded import stacked_sharding
from jbtx.methods.router_init import hidden_sums_step
from jbtx.models.llama import Llama
from jbtx.pipeline import experiments, registry
from jbtx.pipeline.stages.evaluation import checkpoint_rows
from jbtx.runtime import sharding
from jbtx.runtime.topologies import GiB
from jbtx.training.compilation import (
    StepCost,
    abstract_rows,
    abstract_sharded_params,
    compile_eval_step,
    compile_generation,
    compile_step,
    compile_train_step,
)
from jbtx.training.metrics import train_flops_per_token
from jbtx.training.step import abstract_batch

TRAIN, EVAL, GENERATE = "train step", "eval step", "generation"
ENSEMBLE, ROUTER_INIT = "ensemble generation", "router init"
_PROMPT_TOKENS = 256  # the prompt length generation is compiled for


@dataclasses.dataclass(frozen=True)
class CompileJob:
  """One step to compile: `stages` run it (the same program for all of them)."""

  stages: tuple[str, ...]
  step: str  # TRAIN, EVAL, GENERATE, ENSEMBLE or ROUTER_INIT
  config: ExperimentConfig  # the experiment the step runs in (a stage's, for TRAIN)

  @property
  def label(self) -> str:
    return f"{', '.join(self.stages)} ({self.step})"


def _shape_key(job: CompileJob) -> str:
  """What decides a compiled step's program: the model, the batch shape, how the
  optimizer's state and micro-batches are laid out, and the mesh (learning rates and
  step counts are constants in it)."""
  config = job.config
  data, optimizer = config.data, config.optimizer
  state = (optimizer.freeze, optimizer.moment_dtype) if job.step == TRAIN else ()
  return repr((job.step, to_dict(config.model), data.batch_size, data.seq_len,
               optimizer.grad_accum_steps, state, to_dict(config.mesh)))


def _grouped(jobs: list[CompileJob]) -> list[CompileJob]:
  """Jobs of one shape merged into one, in first-seen order."""
  merged: dict[str, CompileJob] = {}
  for job in jobs:
    key = _shape_key(job)
    first = merged.get(key)
    merged[key] = dataclasses.replace(first, stages=first.stages + job.stages) if first else job
  return list(merged.values())


def _evaluated_models(config: ExperimentConfig) -> dict[str, ModelConfig]:
  """The model of every checkpoint row of the results table, by its stage."""
  models = {}
  for _, (kind, stage) in checkpoint_rows(config).items():
    derived = kind.experiment(config, stage)
    models[stage] = derived.model if derived is not None else config.model
  return models


def _decodes(config: ExperimentConfig) -> bool:
  """Whether the eval stage generates text (demo tasks or exact-match task files)."""
  return bool(config.eval.tasks or (config.btx.task_examples and task_domains(config)))


def compile_jobs(config: ExperimentConfig, selected: Sequence[str] = ()) -> list[CompileJob]:
  """The steps of `config`'s stages (only those of `selected` stages when given; "eval"
  selects the evaluation's steps, "mix" the router initialisation from hidden states)."""
  names = registry.stage_names(config)
  chosen = set(selected or names)
  unknown = sorted(chosen - set(names))
  if unknown:
    raise ValueError(f"not stages of this experiment: {', '.join(unknown)}; its stages are "
                     f"{', '.join(names)}")
  jobs = []
  for stage in names:
    derived = registry.kind_of(config, stage).experiment(config, stage)
    if derived is not None and stage in chosen:
      # A training stage validates with the eval step before, during and after.
      jobs += [CompileJob((stage,), TRAIN, derived), CompileJob((stage,), EVAL, derived)]
  if "mix" in chosen and config.btx.router_init == "hidden":
    jobs.append(CompileJob(("mix",), ROUTER_INIT, config))
  if "eval" in chosen:
    # BTX's checks are the seed's: the evaluated models may be MoE models.
    evaluation = dataclasses.replace(experiments.eval_config(config), btx=BTXConfig())
    for stage, model in _evaluated_models(config).items():
      evaluated = dataclasses.replace(evaluation, model=model)
      jobs.append(CompileJob((f"eval:{stage}",), EVAL, evaluated))
      if _decodes(config):
        jobs.append(CompileJob((f"eval:{stage}",), GENERATE, evaluated))
    if "btm" in config.btx.baselines and not config.btm.clusters and _decodes(config):
      jobs.append(CompileJob(("eval:btm",), ENSEMBLE, config))
  return _grouped(jobs)


def _new_tokens(config: ExperimentConfig) -> int:
  return max([config.eval.max_new_tokens, *config.btx.task_max_tokens.values()])


def _compile_generation(job: CompileJob, devices: Sequence[jax.Device]) -> StepCost:
  config = job.config
  prompt = min(_PROMPT_TOKENS, config.model.max_seq_len - _new_tokens(config))
  return compile_generation(config, devices, config.eval.batch_size, prompt,
                            _new_tokens(config))


def _compile_ensemble(job: CompileJob, devices: Sequence[jax.Device]) -> StepCost:
  """BTM's ensemble decoding: every member sharded, stacked on a leading axis."""
  config = job.config
  mesh = sharding.make_mesh(config.mesh, devices)
  model = Llama(config.model)
  members = len(config.btx.expert_names)
  params = jax.tree.map(lambda p, s: jax.ShapeDtypeStruct((members, *p.shape), p.dtype,
                                                          sharding=s),
                        abstract_sharded_params(model, mesh), stacked_sharding(model, mesh))
  new_tokens = _new_tokens(config)
  prompt = min(_PROMPT_TOKENS, config.model.max_seq_len - new_tokens)
  rows = -(-config.eval.batch_size // sharding.batch_shards(mesh)) * sharding.batch_shards(mesh)
  decoder = ensemble_decoder(model, mesh, new_tokens, max(config.btm.top_k), config.btm.smoothing,
                             None, False)
  inputs = (abstract_rows(mesh, (rows, prompt)), abstract_rows(mesh, (rows,)))
  return compile_step(decoder, mesh, (params, *inputs), params, 0.0)


def _compile_router_init(job: CompileJob, devices: Sequence[jax.Device]) -> StepCost:
  """The seed's mean FFN inputs over a training batch, the seed sharded."""
  config = job.config
  mesh = sharding.make_mesh(config.mesh, devices)
  model = Llama(config.model)
  params = abstract_sharded_params(model, mesh)
  flops = train_flops_per_token(config.model, config.data.seq_len) / 3 * \
      config.data.batch_size * config.data.seq_len / len(devices)
  return compile_step(hidden_sums_step(model, mesh), mesh,
                      (params, abstract_batch(config.data, mesh)), params, flops)


_COMPILERS: dict[str, Callable[[CompileJob, Sequence[jax.Device]], StepCost]] = {
    TRAIN: lambda job, devices: compile_train_step(job.config, devices),
    EVAL: lambda job, devices: compile_eval_step(job.config, devices),
    GENERATE: _compile_generation, ENSEMBLE: _compile_ensemble,
    ROUTER_INIT: _compile_router_init,
}


@dataclasses.dataclass(frozen=True)
class Report:
  """A compiled job, its cost per device and the devices' memory (None: unknown); or,
  when the compiler itself found that it does not fit, its message (`cost` None)."""

  job: CompileJob
  cost: StepCost | None
  device_memory: int | None
  seconds: float
  refusal: str = ""

  def fits(self, margin: float) -> bool:
    """Whether the step's peak leaves `margin` (a fraction) of the memory free."""
    if self.cost is None:
      return False
    return self.device_memory is None or self.cost.total_bytes <= (1 - margin) * self.device_memory

  def shortfall(self, margin: float) -> str:
    """Why it does not fit, with the bytes."""
    if self.cost is None:
      return f"the compiler refused it: {self.refusal}"
    total = self.cost.total_bytes
    return (f"{total:,} bytes ({total / GiB:.2f} GiB) per device, "
            f"{(1 - margin) * self.device_memory / GiB:.2f} GiB available")


def compile_job(job: CompileJob, devices: Sequence[jax.Device],
                device_memory: int | None) -> Report:
  """Compiles `job` for `devices` (its config's mesh over them); a step that the TPU
  compiler finds too large for the devices' memory is reported, not raised."""
  began = time.perf_counter()
  try:
    cost = _COMPILERS[job.step](job, devices)
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    message = str(e).split("RESOURCE_EXHAUSTED:", 1)[-1].strip().splitlines()[0]
    return Report(job, None, device_memory, time.perf_counter() - began, message)
  return Report(job, cost, device_memory, time.perf_counter() - began)


def _gib(n: float) -> str:
  return f"{n / GiB:.2f} GiB"


def describe(report: Report, devices: Sequence[jax.Device]) -> str:
  """The report of one job, as lines for the console."""
  cost = report.cost
  memory = _gib(report.device_memory) if report.device_memory else "unknown"
  where = f"{len(devices)} × {devices[0].device_kind} ({memory} each)"
  if cost is None:
    return f"{report.job.label}: on {where}, does not fit: {report.refusal}"
  mesh = " × ".join(f"{axis} {size}" for axis, size in cost.mesh.items())
  lines = [f"{report.job.label}: mesh {mesh} on {where}, compiled in {report.seconds:.0f} s",
           f"  parameters + optimizer state  {_gib(cost.state_bytes)}" if report.job.step == TRAIN
           else f"  parameters                    {_gib(cost.state_bytes)}",
           f"  arguments / outputs / aliased {_gib(cost.argument_bytes)} / "
           f"{_gib(cost.output_bytes)} / {_gib(cost.alias_bytes)}",
           f"  temporaries                   {_gib(cost.temp_bytes)}",
           f"  code                          {_gib(cost.code_bytes)}"]
  total = f"  total                         {_gib(cost.total_bytes)} ({cost.total_bytes:,} bytes)"
  if report.device_memory:
    headroom = report.device_memory - cost.total_bytes
    total += f", headroom {_gib(headroom)} ({headroom / report.device_memory:.0%})"
  collectives = ", ".join(f"{k} {v}" for k, v in cost.collectives.items()) or "none"
  lines += [total, f"  collectives                   {collectives}",
            f"  FLOPs per device              XLA {cost.xla_flops:.3e} (a loop body once), "
            f"jbtx {cost.model_flops:.3e}"]
  return "\n".join(lines)


def summary(reports: Sequence[Report], margin: float) -> str:
  """One line per job: state, temporaries, total, headroom and whether it fits."""
  header = ("step", "state", "temporaries", "total", "memory", "headroom", "fits")
  rows = [header]
  for r in reports:
    memory, cost = r.device_memory, r.cost
    if cost is None:
      rows.append((r.job.label, "-", "-", "-", _gib(memory) if memory else "-", "-", "NO"))
      continue
    rows.append((r.job.label, _gib(cost.state_bytes), _gib(cost.temp_bytes),
                 _gib(cost.total_bytes), _gib(memory) if memory else "-",
                 f"{(memory - cost.total_bytes) / memory:.0%}" if memory else "-",
                 "yes" if r.fits(margin) else "NO"))
  widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
  return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(row, widths, strict=True)))
                   for row in rows)

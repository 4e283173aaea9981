"""The stage registry: every kind of stage (seed, expert, mix, a baseline, …) is one
`Stage` subclass in its own module of `jbtx.pipeline.stages`, registered with
`@register`. The runner, the workdir checks, `btx.only`, `python -m jbtx.eval` and the
config checks all read it, so adding a baseline is one module plus its config group.

    kinds()                     every registered kind, in run order
    stage_names(config)         the experiment's stages, in run order
    kind_of(config, stage)      the kind that owns a stage
    inputs(config, stage)       the stages it reads
    validate(config)            the checks of every kind the experiment uses

An experiment's stages are those its kinds ask for (`Stage.wanted`: the BTX finetune,
each baseline of `btx.baselines`, the evaluation, …) and, transitively, their inputs
(the mix, the experts, the seed), run in order of `Stage.phase`.
"""

from __future__ import annotations

import importlib
import pathlib
import pkgutil
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from jbtx.config import ConfigError, ExperimentConfig
from jbtx.interop import checkpoint
from jbtx.runtime.signals import StopSignal

if TYPE_CHECKING:
  from jbtx.pipeline.workdir import Paths

_KINDS: dict[str, Stage] = {}
_loaded = False
S = TypeVar("S", bound=type)


class Stage:
  """A kind of stage. Subclasses set `name` and `phase` and implement `stages`,
  `identity` and `run`; the other methods have defaults that fit a training stage.

  A stage is a string: the kind's name for a kind with one stage ("mix"), or a name
  of its own kind ("expert/math", "cluster/0").
  """

  name: ClassVar[str]
  # When its stages run: 0 seed, 10 domain experts, 20 BTX's mix and finetune,
  # 30 baselines (in the order of btx.baselines), 40 evaluation, 50 export.
  phase: ClassVar[int]
  # Where its checkpoint rows stand in the results table (see `rows`).
  row_order: ClassVar[int] = 50
  # Stage-kinds that are baselines are selected by `btx.baselines`.
  baseline: ClassVar[bool] = False
  # A stage that only reads other stages' outputs (the evaluation) runs again when its
  # identity changes, its old output set aside (`set_aside`), instead of being refused.
  reruns_when_changed: ClassVar[bool] = False
  # Its inputs are every stage of the experiment that runs before it (the evaluation).
  reads_earlier_stages: ClassVar[bool] = False

  def stages(self, config: ExperimentConfig) -> list[str]:
    """Every stage of this kind the experiment could run, in order."""
    raise NotImplementedError

  def wanted(self, config: ExperimentConfig) -> list[str]:
    """The stages the experiment runs because of this kind (their inputs follow)."""
    return []

  def inputs(self, config: ExperimentConfig, stage: str) -> list[str]:
    """The stages whose outputs `stage` reads (see also `reads_earlier_stages`)."""
    return []

  def experiment(self, config: ExperimentConfig, stage: str) -> ExperimentConfig | None:
    """The experiment a training stage runs (None for a stage that trains nothing)."""
    return None

  def identity(self, config: ExperimentConfig, stage: str) -> dict[str, Any]:
    """What `stage`'s output depends on, as a nested dict (`jbtx.pipeline.identity`)."""
    raise NotImplementedError

  def validate(self, config: ExperimentConfig) -> None:
    """Raises ConfigError (naming the key) if this kind cannot run `config`."""

  def check_files(self, config: ExperimentConfig) -> None:
    """Raises ConfigError (naming the key) if a file outside the workdir that `config`
    names for this kind is missing or does not fit (a converted seed)."""

  def run(self, config: ExperimentConfig, paths: Paths, stop: StopSignal, stage: str) -> None:
    """Makes `stage`'s output in `paths.stage_dir(stage)`."""
    raise NotImplementedError

  def directory(self, workdir: pathlib.Path, stage: str) -> pathlib.Path:
    """Where `stage`'s output lives."""
    return workdir / stage

  def output(self, paths: Paths, stage: str) -> pathlib.Path:
    """Where `stage`'s result is read from (its directory, unless given elsewhere)."""
    return paths.stage_dir(stage)

  def done(self, paths: Paths, stage: str) -> bool:
    """Whether `stage` is complete (its output's last file exists)."""
    return (paths.stage_dir(stage) / checkpoint.CONFIG_FILE).is_file()

  def set_aside(self, paths: Paths, stage: str) -> None:
    """Moves a finished output of `stage` aside (`reruns_when_changed` kinds)."""
    raise NotImplementedError

  def rows(self, config: ExperimentConfig) -> dict[str, str]:
    """Rows of the results table that are this kind's checkpoints: row -> stage."""
    return {}

  def row_training(self, config: ExperimentConfig, row: str) -> list[str]:
    """The stages whose training compute row `row` adds up (its own by default)."""
    return [self.rows(config)[row]]

  def ensembles(self, config: ExperimentConfig) -> list[str]:
    """The stages the rows of `evaluate_ensembles` read (empty: no such rows)."""
    return []

  def evaluate_ensembles(self, config: ExperimentConfig, paths: Paths) -> dict[str, Any]:
    """Results rows computed from several checkpoints (BTM's ensembles and averages)."""
    return {}

  def position(self, config: ExperimentConfig) -> int:
    """Order among the kinds of one phase (a baseline's place in `btx.baselines`)."""
    baselines = config.btx.baselines
    return baselines.index(self.name) if self.baseline and self.name in baselines else 0


def register(cls: S) -> S:
  """Class decorator: registers an instance of the `Stage` subclass `cls` by its name
  (a later registration of the same name replaces the earlier one)."""
  _KINDS[cls.name] = cls()
  return cls


def unregister(name: str) -> None:
  """Removes the kind `name` (tests that register a kind of their own)."""
  _KINDS.pop(name, None)


def kinds(config: ExperimentConfig | None = None) -> list[Stage]:
  """Every registered kind, by phase (then position in `btx.baselines` with `config`,
  then name)."""
  _load_stage_modules()
  key: Callable[[Stage], tuple[int, int, str]] = lambda k: (
      k.phase, k.position(config) if config is not None else 0, k.name)
  return sorted(_KINDS.values(), key=key)


def kind(name: str) -> Stage:
  """The kind registered as `name`."""
  _load_stage_modules()
  return _KINDS[name]


def baseline_names() -> list[str]:
  """The kinds `btx.baselines` may list."""
  return sorted(k.name for k in kinds() if k.baseline)


def stage_names(config: ExperimentConfig) -> list[str]:
  """The experiment's stages in run order: those its kinds want, and their inputs."""
  ordered = [(k, s) for k in kinds(config) for s in k.stages(config)]
  owner = dict((s, k) for k, s in ordered)
  chosen: set[str] = set()
  pending = [s for k in kinds(config) for s in k.wanted(config)]
  while pending:
    stage = pending.pop()
    if stage not in chosen:
      chosen.add(stage)
      if not owner[stage].reads_earlier_stages:
        pending += owner[stage].inputs(config, stage)
  return [s for _, s in ordered if s in chosen]


def inputs(config: ExperimentConfig, stage: str) -> list[str]:
  """The stages whose outputs `stage` reads."""
  owner = kind_of(config, stage)
  if owner.reads_earlier_stages:
    return [s for s in stage_names(config) if kind_of(config, s).phase < owner.phase]
  return owner.inputs(config, stage)


def kind_of(config: ExperimentConfig, stage: str) -> Stage:
  """The kind that owns `stage`; ConfigError ('btx.only') if none does."""
  for k in kinds(config):
    if stage in k.stages(config):
      return k
  raise ConfigError("btx.only", f"{stage!r} is not a stage of this experiment")


def validate(config: ExperimentConfig, files: bool = True) -> None:
  """The checks of the kinds the experiment uses (those with stages in it, and the
  listed baselines), with `files` those of the files they read from outside the
  workdir, the baselines' names and `btx.only`.

  Raises:
    ConfigError: naming the key.
  """
  known = baseline_names()
  for name in config.btx.baselines:
    if name not in known:
      raise ConfigError("btx.baselines", f"unknown baseline {name!r}; the registered "
                        f"ones are {', '.join(known)}")
  names = stage_names(config)
  used = {kind_of(config, s).name for s in names} | set(config.btx.baselines)
  for k in kinds(config):
    if k.name in used:
      k.validate(config)
      if files:
        k.check_files(config)
  if config.btx.only and config.btx.only not in names:
    raise ConfigError("btx.only", f"must be one of {', '.join(names)}, got "
                      f"{config.btx.only!r}")


def _load_stage_modules() -> None:
  """Imports every module of `jbtx.pipeline.stages` (each registers its kind)."""
  global _loaded
  if _loaded:
    return
  package = importlib.import_module("jbtx.pipeline.stages")
  for module in pkgutil.iter_modules(package.__path__):
    importlib.import_module(f"{package.__name__}.{module.name}")
  _loaded = True

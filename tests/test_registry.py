"""The stage registry: a kind of stage registered from outside the pipeline's code is
listed, validated, run with `btx.only`, skipped when done and guarded by the workdir's
identity checks like the built-in ones."""

import json
from typing import Any, ClassVar

import pytest

from configs import btx
from jbtx.config import ConfigError, ExperimentConfig, from_mapping
from jbtx.pipeline import registry, runner, workdir
from jbtx.pipeline.registry import Stage, register
from jbtx.runtime import files


class Notes(Stage):
  """A trivial baseline: writes the experiment's seed and domains to `notes/notes.json`."""

  name = "notes"
  phase = 30
  baseline = True
  runs: ClassVar[list[str]] = []

  def stages(self, config: ExperimentConfig) -> list[str]:
    return [self.name] if self.name in config.btx.baselines else []

  def wanted(self, config: ExperimentConfig) -> list[str]:
    return self.stages(config)

  def identity(self, config: ExperimentConfig, stage: str) -> dict[str, Any]:
    return {"seed": config.seed, "domains": sorted(config.data.domains)}

  def validate(self, config: ExperimentConfig) -> None:
    if config.seed < 0:
      raise ConfigError("seed", "notes needs a non-negative seed")

  def run(self, config, paths, stop, stage):
    Notes.runs.append(stage)
    files.write_json(paths.stage_dir(stage) / "notes.json",
                     {"seed": config.seed, "domains": sorted(config.data.domains)})

  def done(self, paths, stage) -> bool:
    return (paths.stage_dir(stage) / "notes.json").is_file()


@pytest.fixture
def notes():
  register(Notes)
  Notes.runs.clear()
  yield
  registry.unregister(Notes.name)


def _config(seed: int = 0, **btx_settings) -> ExperimentConfig:
  raw = btx.get_config()
  raw.seed = seed
  raw.btx.update(baselines=("btm", "notes"), **btx_settings)
  return from_mapping(ExperimentConfig, raw)


def test_a_registered_baseline_joins_the_experiment(notes):
  config = _config()
  assert "notes" in registry.baseline_names()
  names = registry.stage_names(config)
  assert names.index("notes") == names.index("finetune") + 1  # the baselines' phase
  assert registry.kind_of(config, "notes").name == "notes"
  assert "notes" in registry.inputs(config, "eval")  # the evaluation runs after it
  with pytest.raises(ConfigError, match="'seed': notes needs a non-negative seed"):
    registry.validate(_config(seed=-1))


def test_a_registered_stage_runs_alone_and_is_guarded_by_its_identity(notes, tmp_path):
  runner.run(_config(only="notes"), tmp_path)
  assert Notes.runs == ["notes"]
  assert json.loads((tmp_path / "notes" / "notes.json").read_text())["seed"] == 0
  recorded = json.loads((tmp_path / "notes" / workdir.STAGE_FILE).read_text())
  assert recorded == {"seed": 0, "domains": ["code", "general", "knowledge", "math"]}
  runner.run(_config(only="notes"), tmp_path)  # complete: skipped
  assert Notes.runs == ["notes"]
  with pytest.raises(ConfigError, match=r"'seed':.*notes was made by another experiment "
                     r"\(seed: was 0, now 1\)"):
    runner.run(_config(seed=1, only="notes"), tmp_path)


def test_an_unregistered_stage_is_refused_by_name(tmp_path):
  with pytest.raises(ConfigError, match="unknown baseline 'notes'"):
    runner.run(_config(only="notes"), tmp_path)
  assert not tmp_path.joinpath("notes").exists()

"""Config parsing: every bad value is rejected with a message naming its key."""

import dataclasses
import json
import subprocess
import sys

import ml_collections
import pytest

from configs import btm, btx, dense, llama2_7b_btx, llama_moe, olmoe, olmoe_tiny, upcycle
from jbtx.config import (
    ConfigError,
    ExperimentConfig,
    ModelConfig,
    from_mapping,
    to_config_dict,
    to_dict,
)
from jbtx.data import demo
from jbtx.interop import checkpoint
from jbtx.models import presets
from jbtx.pipeline import budgets, experiments, registry


def _experiment(**model_overrides) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = presets.config_dict("tiny", **model_overrides)
  config.train = ml_collections.ConfigDict({"steps": 100})
  return config


@dataclasses.dataclass(frozen=True)
class _Inner:
  x: int = 0


@dataclasses.dataclass(frozen=True)
class _Outer:
  named: dict[str, _Inner] = dataclasses.field(default_factory=dict)
  pair: tuple[int, float] = (0, 0.0)
  many: tuple[str, ...] = ()


def test_named_groups_and_lists_are_coerced():
  config = ml_collections.ConfigDict({"named": {"a": {"x": 1}}, "pair": [1, 2],
                                      "many": ("u", "v")})
  assert from_mapping(_Outer, config) == _Outer({"a": _Inner(1)}, (1, 2.0), ("u", "v"))


@pytest.mark.parametrize("data, key, fragment", [
    ({"named": {"a": {"y": 1}}}, "named.a.y", "unknown key"),
    ({"named": {"a": {"x": "1"}}}, "named.a.x", "expected an integer"),
    ({"named": [1]}, "named", "expected a group of named settings"),
    ({"pair": [1]}, "pair", "expected 2 items"),
    ({"many": "uv"}, "many", "expected a list"),
    ({"many": ["u", 3]}, "many[1]", "expected str"),
])
def test_named_groups_and_lists_name_the_bad_entry(data, key, fragment):
  with pytest.raises(ConfigError) as info:
    from_mapping(_Outer, data)
  assert info.value.key == key and fragment in str(info.value)


def test_valid_config_becomes_frozen_dataclasses():
  config = from_mapping(ExperimentConfig, _experiment())
  assert config.model == presets.get("tiny")
  assert config.train.steps == 100 and config.data.seq_len == 256  # defaults filled in
  with pytest.raises(AttributeError):
    config.model.n_layers = 3


@pytest.mark.parametrize("mutate, key, fragment", [
    (lambda c: c.model.update(n_kv_heads=3), "model.n_kv_heads", "must divide n_heads (4)"),
    (lambda c: c.model.update(n_heads=5), "model.n_heads", "must divide d_model (128)"),
    (lambda c: c.model.update(d_model=120, n_heads=8), "model.n_heads", "must be even"),
    (lambda c: c.model.update(n_layers=0), "model.n_layers", "must be positive"),
    (lambda c: c.model.update(dtype="float64"), "model.dtype", "must be one of"),
    (lambda c: c.model.update(remat_policy="some"), "model.remat_policy", "must be one of"),
    (lambda c: c.model.update(rope_theta=-1.0), "model.rope_theta", "must be positive"),
    (lambda c: c.model.update(moe={"n_experts": 4, "top_k": 5}), "model.moe.top_k",
     "must be at most n_experts (4)"),  # inside an optional group: its own key
    (lambda c: c.model.update(vocab_size=100), "model.vocab_size", "byte tokens"),
    (lambda c: c.train.update(steps=0), "train.steps", "must be positive"),
    (lambda c: c.update(optimizer={"warmup_steps": 500}), "optimizer.warmup_steps",
     "exceeds train.steps (100)"),
    (lambda c: c.update(data={"seq_len": 1024}), "data.seq_len", "exceeds model.max_seq_len"),
    (lambda c: c.update(data={"tokenizer": {"type": "nope"}}), "data.tokenizer.type",
     "must be one of"),
    (lambda c: c.update(data={"domains": {"m": {"name": "maths"}}}), "data.domains.m.name",
     "demo domains are"),
    (lambda c: c.update(data={"domains": {"m": {"source": "files"}}}),
     "data.domains.m.splits", "needs a 'train' entry"),
    (lambda c: c.update(data={"domains": {"m": {"name": "math", "weight": -1}}}),
     "data.domains.m.weight", "must be non-negative"),
])
def test_impossible_values_name_their_key(mutate, key, fragment):
  config = _experiment()
  mutate(config)
  with pytest.raises(ConfigError) as info:
    from_mapping(ExperimentConfig, config)
  assert info.value.key == key
  assert fragment in str(info.value) and f"'{key}'" in str(info.value)


@pytest.mark.parametrize("data, key, fragment", [
    ({"n_layerz": 2}, "model.n_layerz", "unknown key"),
    ({"n_layers": "4"}, "model.n_layers", "expected an integer"),
    ({"n_layers": 4.0}, "model.n_layers", "expected an integer"),
    ({"scan_layers": 1}, "model.scan_layers", "expected bool"),
    ({"rope_theta": True}, "model.rope_theta", "expected a number"),
])
def test_unknown_keys_and_wrong_types_name_their_key(data, key, fragment):
  model = presets.get("tiny").__dict__ | data
  with pytest.raises(ConfigError) as info:
    from_mapping(ExperimentConfig, {"model": model})
  assert info.value.key == key and fragment in str(info.value)


def test_missing_required_key():
  fields = dict(presets.get("tiny").__dict__)
  del fields["d_ff"]
  with pytest.raises(ConfigError, match="'d_ff': missing required key"):
    from_mapping(ModelConfig, fields)


def test_integers_are_accepted_for_floats():
  assert from_mapping(ModelConfig, presets.get("tiny").__dict__ | {"rope_theta": 500000}
                      ).rope_theta == 500000.0


def _flat_keys(tree: dict, prefix: str = "") -> set[str]:
  keys = set()
  for name, value in tree.items():
    if isinstance(value, dict) and value:
      keys |= _flat_keys(value, f"{prefix}{name}.")
    else:
      keys.add(prefix + name)
  return keys


@pytest.mark.parametrize("mutate, key, fragment", [
    (lambda c: c.btx.experts.update(law={}), "btx.experts.law", "not a domain of data.domains"),
    (lambda c: c.btx.experts.update(seed={}), "btx.experts.seed", "names the seed's expert"),
    (lambda c: c.btx.update(only="expert/law"), "btx.only",
     "must be one of seed, expert/code, expert/knowledge, expert/math, mix, finetune, "
     "upcycle, dense, eval, export, got 'expert/law'"),
    (lambda c: c.btx.update(baselines=("btm", "dropout")), "btx.baselines",
     "unknown baseline 'dropout'; the registered ones are btm, dense, llama_moe, olmoe, "
     "upcycle"),
    (lambda c: c.btx.update(upcycle_every=2), "btx.upcycle_every",
     "this key moved to 'upcycle.every'"),
    (lambda c: (c.btx.update(baselines=("upcycle",)), c.upcycle.update(every=2)),
     "upcycle.every", "must divide model.n_layers (3), got 2"),
    (lambda c: c.btm.update(top_k=(1, 5)), "btm.top_k", "5 exceeds the ensemble's 4 experts"),
    (lambda c: c.btm.update(clusters=3, top_k=(4,)), "btm.top_k",
     "4 exceeds the ensemble's 3 experts"),
    (lambda c: c.btm.update(clusters=1), "btm.clusters", "0 (BTM) or at least 2 (c-BTM)"),
    (lambda c: c.btx.update(train_btx=False, baselines=()), "btx.train_btx",
     "there is nothing to run after the seed"),
    (lambda c: c.btx.update(baselines=("btm", "btm")), "btx.baselines", "twice"),
    (lambda c: c.btx.update(ffn="split", split_chunks=5), "btx.split_chunks",
     "must divide model.d_ff (256)"),
    (lambda c: (c.btx.update(seed_as_expert=False), c.btx.moe.update(top_k=4)),
     "btx.moe.top_k", "exceeds the 3 mixed experts"),
    (lambda c: c.btx.update(mix_weights={"law": 1.0}), "btx.mix_weights.law",
     "not a mixed model"),
    (lambda c: setattr(c.btx, "finetune_weights", {"math": 0.0}), "btx.finetune_weights",
     "sum to 0"),
    (lambda c: setattr(c.btx, "task_max_tokens", {"math": 8}), "btx.task_max_tokens",
     "'knowledge'"),
    (lambda c: c.btx.experts.math.update(steps=-1), "btx.experts.math.steps",
     "must be non-negative"),
    (lambda c: c.update(model=presets.config_dict("tiny_moe")), "model.moe",
     "a BTX seed is a dense model"),
    (lambda c: (c.btx.update(baselines=("llama_moe",)), c.llama_moe.moe.update(n_experts=6)),
     "llama_moe.moe.n_experts", "d_ff = 256 neurons do not split into 6 equal groups"),
    (lambda c: (c.btx.update(baselines=("llama_moe",)), c.llama_moe.update(
        split="sharing_inner", shared_experts=2)), "llama_moe.moe.n_experts",
     "256 neurons do not split into 10 equal groups (8 experts + 2 shared)"),
    (lambda c: c.llama_moe.moe.update(n_shared_experts=1), "llama_moe.moe.n_shared_experts",
     "is set by the split"),
])
def test_btx_settings_name_their_key(mutate, key, fragment):
  """Bad BTX settings are refused by the config or by the checks of the stage kinds
  (`registry.validate`, which runs before anything is written), naming the key."""
  config = btx.get_config()
  mutate(config)
  with pytest.raises(ConfigError) as info:
    registry.validate(from_mapping(ExperimentConfig, config))
  assert info.value.key == key
  assert fragment in str(info.value)


@pytest.mark.parametrize("platform", ["tpu_v5p_128", "tpu_v6e_64", "gpu_8"])
def test_paper_scale_btx_config_is_the_papers_model(platform):
  config = from_mapping(ExperimentConfig, llama2_7b_btx.get_config(platform))
  assert config.btx.expert_names == ("code", "math", "wiki", "seed")
  assert config.data.seq_len * config.data.batch_size == 4096 * 1024  # 4M-token batches
  moe = experiments.moe_model_config(config)
  # BTX (Sukhbaatar et al. 2024): 19.7B parameters, 11.1B active with top-2 of 4.
  assert round(moe.num_params() / 1e9, 1) == 19.7
  assert round(moe.num_active_params() / 1e9, 1) == 11.1
  finetune = experiments.finetune_config(config)
  assert finetune.optimizer.learning_rate == 1e-4 and finetune.optimizer.warmup_steps == 100
  assert finetune.data.domains["code"].weight == 40.31


@pytest.mark.parametrize("experiment, names", [
    (btm, ["seed", "expert/code", "expert/knowledge", "expert/math", "eval"]),
    (upcycle, ["seed", "upcycle", "eval"]),
    (dense, ["seed", "dense", "eval"]),
    (llama_moe, ["seed", "llama_moe", "eval"]),
    (olmoe, ["olmoe", "eval"]),  # from scratch: no seed
    (btx, ["seed", "expert/code", "expert/knowledge", "expert/math", "mix", "finetune",
           "upcycle", "dense", "eval", "export"]),
])
def test_each_baseline_config_runs_its_own_stages(experiment, names):
  config = from_mapping(ExperimentConfig, experiment.get_config())
  assert registry.stage_names(config) == names
  clustered = experiment.get_config()
  clustered.btm.clusters = 4
  if "btm" in clustered.btx.baselines and not clustered.btx.train_btx:
    assert registry.stage_names(from_mapping(ExperimentConfig, clustered)) == [
        "seed", "clusters", "cluster/0", "cluster/1", "cluster/2", "cluster/3", "eval"]


@pytest.mark.parametrize("experiment", [btx, olmoe_tiny, btm, upcycle, dense, llama_moe, olmoe])
def test_experiment_files_list_every_key(experiment):
  """So that every key can be overridden on the command line."""
  raw = experiment.get_config()
  config = from_mapping(ExperimentConfig, raw)
  assert _flat_keys(to_dict(config)) <= _flat_keys(raw.to_dict())
  assert from_mapping(ExperimentConfig, to_config_dict(config)) == config


@pytest.mark.parametrize("overrides, message", [
    (["--config.model.n_kv_heads=3"], "'model.n_kv_heads': must divide n_heads (4), got 3"),
    (["--config.mesh.fsdp=0"], "'mesh.fsdp': must be positive or -1 (fill), got 0"),
    # Keys that are None by default parse as their type (placeholders).
    (["--config.distributed.num_processes=2", "--config.distributed.process_id=2"],
     "'distributed.process_id': must be below num_processes (2), got 2"),
    (["--config.btx.olmoe.top_k=2"],
     "'btx.olmoe.top_k': this key moved to 'olmoe.moe.top_k'; set that instead"),
    (["--config.data.reweighting=loss", "--config.data.domains.code.reference_loss=1.5",
      "--config.data.domains.math.reference_loss=1.5",
      "--config.data.domains.general.reference_loss=1.5"],
     "'data.domains.knowledge.reference_loss': dynamic re-weighting needs a reference"),
])
def test_cli_rejects_bad_override_with_the_key(tmp_path, overrides, message):
  result = subprocess.run(
      [sys.executable, "-m", "jbtx.train", "--config=configs/btx.py",
       f"--workdir={tmp_path / 'run'}", *overrides],
      capture_output=True, text=True, timeout=120)
  assert result.returncode == 2, result.stderr
  assert f"error: config key {message}" in result.stderr
  assert not (tmp_path / "run").exists()  # nothing written for a rejected config


def test_cli_refuses_a_url_workdir_with_advice():
  result = subprocess.run(
      [sys.executable, "-m", "jbtx.train", "--config=configs/btx.py",
       "--workdir=gs://bucket/run"], capture_output=True, text=True, timeout=120)
  assert result.returncode == 1
  assert "--workdir=gs://bucket/run: jbtx writes through the local file system" in result.stderr


def test_olmoe_needs_a_seed_checkpoint_that_records_its_flops(tmp_path):
  """OLMoE's budget is the seed's FLOPs plus BTX's: the shipped demo seed records them,
  a converted checkpoint does not."""
  record = checkpoint.read_record(demo.SEED_DIR)
  converted = tmp_path / "converted"
  (converted / checkpoint.PARAMS_DIR).mkdir(parents=True)
  (converted / checkpoint.CONFIG_FILE).write_text(json.dumps(
      {k: record[k] for k in ("format", "version", "kind", "model")}))
  config = btx.get_config()
  config.btx.update(baselines=("olmoe",), train_btx=False)
  registry.validate(from_mapping(ExperimentConfig, config))
  shipped = registry.kind("olmoe").experiment(from_mapping(ExperimentConfig, config), "olmoe")
  assert budgets.seed_flops(from_mapping(ExperimentConfig, config)) == \
      record["metrics"]["compute"]["flops"]
  config.btx.seed_checkpoint = str(converted)
  with pytest.raises(ConfigError) as info:
    registry.validate(from_mapping(ExperimentConfig, config))
  assert info.value.key == "btx.baselines" and "records no training FLOPs" in str(info.value)
  assert shipped.train.steps > budgets.matched_steps(
      from_mapping(ExperimentConfig, config), shipped.model)  # the seed's FLOPs count

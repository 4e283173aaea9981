"""configs/real_seed_btx.py:smoke end to end on a tiny random tied-embedding HF model and
tokenizer written here, by the three commands of docs/real_seeds.md: convert import,
train (seed -> experts -> mix -> finetune -> eval -> export), eval."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

import jbtx
from jbtx.config import ConfigError, ExperimentConfig, from_mapping
from jbtx.interop import checkpoint
from tests import llama_fixtures as fx
from tests.training_runs import run_env  # noqa: F401 (fixture)

STAGES = ["expert/code", "expert/math", "mix", "finetune", "eval", "export"]


def _run(args, env) -> subprocess.CompletedProcess:
  result = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                          env=env, timeout=600)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return result


@pytest.fixture(scope="module")
def real_seed_run(tmp_path_factory, run_env):  # noqa: F811
  """An HF folder as downloaded (SmolLM2-like: tied, a tokenizer adding no BOS), the
  checkpoint `convert import` made of it, and the smoke run's workdir and output."""
  root = tmp_path_factory.mktemp("real_seed")
  source = fx.save_hf(fx.hf_model(fx.TIED, seed=7), root / "SmolLM2-tiny")
  fx.save_tokenizer(source, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
  seed, workdir = root / "ckpt", root / "run"
  _run(["jbtx.convert", "import", f"--source={source}", f"--output={seed}"], run_env)
  result = _run(["jbtx.train", "--config=configs/real_seed_btx.py:smoke",
                 f"--config.btx.seed_checkpoint={seed}", f"--workdir={workdir}"], run_env)
  return source, seed, workdir, result.stdout + result.stderr


def test_convert_import_carries_the_tokenizer(real_seed_run):
  source, seed, *_ = real_seed_run
  for name in ("tokenizer.json", "tokenizer_config.json"):
    assert (seed / name).read_bytes() == (source / name).read_bytes()
  assert checkpoint.load_config(seed).tie_embeddings


def test_smoke_runs_every_stage_with_the_seeds_shape_and_tokenizer(real_seed_run):
  _, seed, workdir, output = real_seed_run
  assert f"[btx] stage 1/7 seed: already complete ({seed})" in output
  for i, stage in enumerate(STAGES, start=2):
    assert f"[btx] stage {i}/7 {stage}: done in " in output
  config = json.loads((workdir / "config.json").read_text())
  assert config["model"]["d_model"] == 60 and config["model"]["tie_embeddings"]
  assert config["data"]["tokenizer"]["path"] == str(seed)
  rows = json.loads((workdir / "results.json").read_text())["rows"]
  assert tuple(rows) == ("seed", "code", "math", "btx")
  for row in rows.values():
    assert set(row["domains"]) == {"code", "math", "knowledge", "general"}
    assert all(np.isfinite(d["loss"]) for d in row["domains"].values())
  mixed = checkpoint.load_params(workdir / "mix", as_numpy=True)
  assert "lm_head" not in mixed and checkpoint.load_config(workdir / "finetune").tie_embeddings


def test_the_export_loads_in_transformers_with_equal_logits(real_seed_run):
  *_, workdir, _ = real_seed_run
  hf = fx.transformers.AutoModelForCausalLM.from_pretrained(workdir / "hf").eval()
  assert type(hf).__name__ == "MixtralForCausalLM" and hf.config.tie_word_embeddings
  model, params = jbtx.load(workdir / "finetune")
  tokens = fx.random_tokens(fx.TIED["vocab_size"], seed=4)
  np.testing.assert_allclose(fx.hf_logits(hf, tokens),
                             np.asarray(model.apply({"params": params}, tokens)), atol=1e-4,
                             rtol=0)
  tokenizer = fx.transformers.AutoTokenizer.from_pretrained(workdir / "hf")
  assert tokenizer.eos_token == "<|endoftext|>"  # the seed's, copied by the export


def test_the_model_shape_is_the_seeds_or_a_named_error(real_seed_run, tmp_path):
  from configs import real_seed_btx

  _, seed, *_ = real_seed_run
  config = real_seed_btx.get_config("smoke")
  config.btx.seed_checkpoint = str(seed)
  resolved = checkpoint.with_seed_model(from_mapping(ExperimentConfig, config))
  assert resolved.model == dataclasses.replace(checkpoint.load_config(seed), max_seq_len=2048)
  assert resolved.data.tokenizer.path == str(seed)
  config.btx.seed_checkpoint = str(tmp_path / "absent")
  with pytest.raises(ConfigError, match=r"'btx.seed_checkpoint'.*jbtx\.json is missing"):
    checkpoint.with_seed_model(from_mapping(ExperimentConfig, config))
  config.btx.seed_checkpoint, config.data.tokenizer.path = "", "tokenizer.json"
  with pytest.raises(ConfigError, match=r"'btx.model_from_seed': needs btx.seed_checkpoint"):
    from_mapping(ExperimentConfig, config)


def test_eval_cli_scores_the_workdir(real_seed_run, run_env, tmp_path):  # noqa: F811
  *_, workdir, _ = real_seed_run
  out = tmp_path / "btx.json"
  _run(["jbtx.eval", f"--workdir={workdir}", "--stage=btx", f"--output={out}",
        "--config.btx.task_examples=0"], run_env)
  rows = json.loads((workdir / "results.json").read_text())["rows"]
  assert json.loads(out.read_text())["rows"]["btx"]["domains"] == rows["btx"]["domains"]

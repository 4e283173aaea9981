"""The main job end to end on a shrunken demo config: trains, saves, loads, skips on rerun."""

import json
import subprocess
import sys

import numpy as np

import jbtx

_FAST = ["--config.train.steps=6", "--config.train.log_every=3", "--config.train.eval_batches=1",
         "--config.optimizer.warmup_steps=2", "--config.data.batch_size=8",
         "--config.data.seq_len=64", "--config.model.n_layers=2", "--config.train.sample_tokens=8"]


def _train(workdir):
  return subprocess.run([sys.executable, "-m", "jbtx.train", "--config=configs/btx.py",
                         f"--workdir={workdir}", *_FAST],
                        capture_output=True, text=True, timeout=600)


def test_seed_stage_trains_saves_and_is_idempotent(tmp_path):
  first = _train(tmp_path)
  assert first.returncode == 0, first.stderr
  assert "[seed] step     6" in first.stdout + first.stderr
  record = json.loads((tmp_path / "seed" / "jbtx.json").read_text())
  metrics = record["metrics"]
  assert metrics["validation"]["loss"] < metrics["validation_before"]["loss"]
  assert json.loads((tmp_path / "config.json").read_text())["model"]["n_layers"] == 2

  model, params = jbtx.load(tmp_path / "seed")
  assert model.config.n_layers == 2
  logits = model.apply({"params": params}, np.array([[256, 100, 101, 102]], np.int32))
  assert logits.shape == (1, 4, 259) and np.isfinite(logits).all()

  second = _train(tmp_path)
  assert second.returncode == 0, second.stderr
  assert "already complete" in second.stdout
  assert "[seed] step" not in second.stdout + second.stderr


def test_moe_model_trains_from_scratch_and_loads_back(tmp_path):
  result = subprocess.run([sys.executable, "-m", "jbtx.train", "--config=configs/olmoe_tiny.py",
                           f"--workdir={tmp_path}", *_FAST],
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr
  assert " aux " in result.stdout + result.stderr  # MoE runs log the auxiliary loss
  model, params = jbtx.load(tmp_path / "seed")
  assert model.config.moe.n_experts == 16 and model.config.qk_norm
  assert params["layers"]["moe"]["gate"].shape == (2, 16, 128, 88)
  logits = model.apply({"params": params}, np.array([[256, 100, 101, 102]], np.int32))
  assert np.isfinite(logits).all()

"""The main job end to end on a shrunken demo config: trains, saves, loads, skips on rerun."""

import json
import subprocess
import sys

import numpy as np

import jbtx
from tests.training_runs import (
    SHORT_ARGS,
    moe_run,  # noqa: F401 (fixture)
)


def _train(workdir):
  return subprocess.run([sys.executable, "-m", "jbtx.train", "--config=configs/btx.py",
                         f"--workdir={workdir}", *SHORT_ARGS],
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
  assert "seed: already complete" in second.stdout
  assert "[seed] step" not in second.stdout + second.stderr


def test_moe_model_trains_from_scratch_and_loads_back(moe_run):  # noqa: F811
  # MoE runs log the auxiliary loss too.
  assert " aux " in (moe_run / "output.txt").read_text()
  model, params = jbtx.load(moe_run / "seed")
  assert model.config.moe.n_experts == 16 and model.config.qk_norm
  assert params["layers"]["moe"]["gate"].shape == (2, 16, 128, 88)
  logits = model.apply({"params": params}, np.array([[256, 100, 101, 102]], np.int32))
  assert np.isfinite(logits).all()

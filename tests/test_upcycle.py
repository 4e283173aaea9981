"""Sparse upcycling and the dense baseline: an upcycled model is the seed before
training, and both baselines get BTX's training FLOPs to within one step's."""

import dataclasses

import jax
import numpy as np
import pytest

from configs import btx
from jbtx.config import ExperimentConfig, MoEConfig, from_mapping
from jbtx.methods.upcycle import upcycle_params
from jbtx.models import presets
from jbtx.models.llama import Llama, init_params
from jbtx.pipeline import budgets, experiments, registry
from jbtx.pipeline.budgets import compute
from jbtx.pipeline.clusters import cluster_config
from jbtx.training.metrics import train_flops_per_token


@pytest.mark.parametrize("every, scan", [(1, True), (2, True), (2, False)])
def test_upcycled_model_computes_the_seed_for_any_router(every, scan):
  dense_config = presets.get("micro")
  dense = jax.device_get(init_params(Llama(dense_config), jax.random.key(0)))
  tokens = np.random.default_rng(0).integers(1, dense_config.vocab_size, (2, 12))
  expected = Llama(dense_config).apply({"params": dense}, tokens)
  config = dataclasses.replace(dense_config, scan_layers=scan,
                               moe=MoEConfig(n_experts=4, top_k=2, every=every))
  for seed in (0, 1):  # two different random routers
    params = upcycle_params(dense, config, seed)
    logits = Llama(config).apply({"params": params}, tokens)
    np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=0)  # float32
  moe = (params["layers"] if every == 1 else params["layers"]["block_1"]) if scan else (
      params["layers_0"]["block_1"])
  gate = moe["moe"]["gate"]
  np.testing.assert_array_equal(gate[..., 0, :, :] if scan else gate[0], gate[..., 3, :, :]
                                if scan else gate[3])  # exact copies


def test_baselines_get_btx_training_flops_to_within_one_step():
  config = btx.get_config()
  config.btx.baselines = ("upcycle", "dense")
  config = from_mapping(ExperimentConfig, config)
  target = budgets.btx_compute(config)["flops"]
  assert target == pytest.approx(
      sum(compute(experiments.expert_config(config, d))["flops"] for d in config.btx.experts)
      + compute(experiments.finetune_config(config))["flops"])
  for name in ("upcycle", "dense"):
    baseline = registry.kind(name).experiment(config, name)
    data = baseline.data
    step = train_flops_per_token(baseline.model, data.seq_len) * data.batch_size * data.seq_len
    assert abs(compute(baseline)["flops"] - target) <= step / 2
    assert baseline.data.domains["code"].weight == config.btx.finetune_weights["code"]
  upcycled = registry.kind("upcycle").experiment(config, "upcycle").model
  assert upcycled.moe.n_experts == 4 and upcycled.moe.d_ff is None
  assert registry.kind("dense").experiment(config, "dense").model == config.model
  assert registry.stage_names(config)[-4:] == ["upcycle", "dense", "eval", "export"]


def test_cbtm_cluster_experts_together_get_btx_training_flops_to_within_one_step(tmp_path):
  config = btx.get_config()
  config.btm.clusters = 3
  config = from_mapping(ExperimentConfig, config)
  parts = [cluster_config(config, i, tmp_path) for i in range(3)]
  steps = [p.train.steps for p in parts]
  assert max(steps) - min(steps) <= 1
  data = parts[0].data
  step = train_flops_per_token(config.model, data.seq_len) * data.batch_size * data.seq_len
  total = sum(compute(p)["flops"] for p in parts)
  assert abs(total - budgets.btx_compute(config)["flops"]) <= step / 2
  assert parts[1].data.domains["cluster1"].splits["train"] == str(tmp_path / "1.train.jsonl")

"""Routing analysis: loads, confidence and co-selection against numpy counts, a router
forced to one expert, token-level assignments, and the saved files."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from jbtx.config import MoEConfig
from jbtx.data.tokenizers import ByteTokenizer
from jbtx.eval import routing_analysis as analysis
from jbtx.models import presets
from jbtx.models.llama import Llama, init_params


def _logits(layers=2, tokens=60, experts=5, seed=0):
  return np.array(jax.random.normal(jax.random.key(seed), (layers, tokens, experts)))


def test_statistics_are_numpy_counts_of_the_top_k_choices():
  logits = _logits()
  config = MoEConfig(n_experts=5, top_k=2)
  stats = analysis.routing_statistics(logits, config)
  top2 = np.argsort(-logits, axis=-1)[..., :2]  # [layers, T, 2], first = highest gate
  for layer in range(2):
    counts = np.bincount(top2[layer].ravel(), minlength=5)
    np.testing.assert_allclose(stats["topk_load"][layer], counts / 120, atol=1e-7)
    np.testing.assert_allclose(stats["top1_load"][layer],
                               np.bincount(top2[layer, :, 0], minlength=5) / 60, atol=1e-7)
    chosen = np.zeros((60, 5))
    np.put_along_axis(chosen, top2[layer], 1.0, axis=-1)
    np.testing.assert_allclose(stats["co_selection"][layer], chosen.T @ chosen / 60, atol=1e-7)
    top = np.sort(logits[layer], axis=-1)[:, -2:]
    gate = np.exp(top[:, 1]) / np.exp(top).sum(-1)  # softmax over the top-2 logits
    assert stats["confidence"][layer] == pytest.approx(gate.mean(), rel=1e-5)
  for name in ("top1_load", "topk_load"):
    np.testing.assert_allclose(stats[name].sum(-1), 1.0, rtol=1e-6)  # per layer
  np.testing.assert_allclose(np.diagonal(stats["co_selection"], axis1=1, axis2=2),
                             2 * stats["topk_load"], rtol=1e-6)
  assert (stats["entropy"] > 0).all() and (stats["entropy"] < np.log(5)).all()


def test_a_router_forced_to_one_expert_puts_all_load_there():
  logits = _logits()
  logits[..., 3] += 100.0
  stats = analysis.routing_statistics(logits, MoEConfig(n_experts=5, top_k=1))
  np.testing.assert_array_equal(stats["top1_load"][:, 3], 1.0)
  np.testing.assert_array_equal(stats["topk_load"][:, 3], 1.0)
  np.testing.assert_allclose(stats["confidence"], 1.0)
  assert stats["entropy"].max() < 1e-6


def test_token_experts_give_each_tokens_experts_by_gate_in_every_layer():
  config = presets.get("micro_moe", n_layers=3, vocab_size=259)
  model = Llama(config)
  params = init_params(model, jax.random.key(0))
  tokenizer = ByteTokenizer()
  ids, experts, gates = analysis.token_experts(model, params, tokenizer, "def f(x):")
  k = config.moe.top_k
  assert ids.tolist() == tokenizer.encode("def f(x):").tolist()
  assert experts.shape == gates.shape == (3, len(ids), k)
  np.testing.assert_allclose(gates.sum(-1), 1.0, rtol=1e-6)  # per token and layer
  assert (np.diff(gates, axis=-1) <= 0).all()  # decreasing gate values
  assert all(len(set(row)) == k for row in experts.reshape(-1, k))


def test_saved_statistics_read_back(tmp_path):
  stats = {"code": analysis.routing_statistics(_logits(), MoEConfig(n_experts=5, top_k=2))}
  analysis.save_statistics(stats, tmp_path)
  loaded = json.loads((tmp_path / "routing.json").read_text())
  np.testing.assert_allclose(loaded["code"]["topk_load"], stats["code"]["topk_load"])
  with np.load(tmp_path / "routing.npz") as arrays:
    np.testing.assert_array_equal(arrays["code/co_selection"], stats["code"]["co_selection"])
  assert sorted(p.name for p in tmp_path.iterdir()) == ["routing.json", "routing.npz"]


def test_expert_choice_routing_is_refused():
  config = dataclasses.replace(MoEConfig(n_experts=5, top_k=2), routing="expert_choice",
                               dispatch="auto")
  with pytest.raises(ValueError, match="expert_choice"):
    analysis.routing_statistics(_logits(), config)

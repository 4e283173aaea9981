"""Expert usage analysis: router logits of real tokens, loads, divergence between domains."""

import dataclasses

import jax
import numpy as np
import pytest

from jbtx.config import DataConfig
from jbtx.eval import routing_analysis as analysis
from jbtx.models import presets
from jbtx.models.llama import Llama, init_params
from jbtx.models.moe import collect_router_logits


def _model():
  config = presets.get("micro_moe", n_layers=3)
  model = Llama(config)
  return model, init_params(model, jax.random.key(0))


def _packed_batch(vocab_size: int):
  """Two rows of 10: row 0 holds two documents, row 1 one document and 4 pad tokens."""
  tokens = np.asarray(jax.random.randint(jax.random.key(1), (2, 10), 1, vocab_size), np.int32)
  segment_ids = np.array([[1] * 6 + [2] * 4, [1] * 6 + [0] * 4], np.int32)
  positions = np.array([list(range(6)) + list(range(4)), list(range(6)) + [0] * 4], np.int32)
  return {"tokens": tokens, "segment_ids": segment_ids, "positions": positions}


def test_router_logits_are_the_sown_logits_of_the_real_tokens():
  model, params = _model()
  batch = _packed_batch(model.config.vocab_size)
  logits = analysis.router_logits(model, params, batch)
  assert logits.shape == (3, 16, 4) and logits.dtype == np.float32
  _, state = model.apply({"params": params}, batch["tokens"], batch["positions"],
                         batch["segment_ids"], mutable=["intermediates"])
  every_token = np.asarray(collect_router_logits(state["intermediates"]))  # [3, 20, 4]
  np.testing.assert_allclose(logits, every_token[:, :16], atol=1e-6)  # pads are the last 4


def test_expert_loads_count_the_top_k_choices():
  logits = np.asarray(jax.random.normal(jax.random.key(2), (2, 50, 6)))
  config = dataclasses.replace(presets.get("micro_moe").moe, n_experts=6, top_k=2)
  loads = analysis.expert_loads(logits, config)
  top2 = np.argsort(-logits, axis=-1)[..., :2]  # [2, 50, 2]
  expected = np.stack([np.bincount(layer.ravel(), minlength=6) / 100 for layer in top2])
  np.testing.assert_allclose(loads, expected, atol=1e-7)


def test_load_divergence_is_zero_for_alike_domains_and_kl_from_the_mean_otherwise():
  alike = {"a": np.array([[0.5, 0.5]]), "b": np.array([[0.5, 0.5]])}
  np.testing.assert_allclose(analysis.load_divergence(alike)["a"], [0.0])
  apart = {"a": np.array([[1.0, 0.0]]), "b": np.array([[0.25, 0.75]])}
  mean = np.array([0.625, 0.375])
  divergence = analysis.load_divergence(apart)
  np.testing.assert_allclose(divergence["a"], [np.log(1 / 0.625)], rtol=1e-6)
  np.testing.assert_allclose(analysis.kl_divergence(apart["a"], [[0.5, 0.5]]), [np.log(2)])
  b = apart["b"][0]
  np.testing.assert_allclose(divergence["b"], [np.sum(b * np.log(b / mean))], rtol=1e-6)


def test_domain_loads_refuse_a_dense_model():
  config = dataclasses.replace(presets.get("micro_moe"), moe=None)
  model = Llama(config)
  with pytest.raises(ValueError, match="no MoE layers"):  # before reading any data
    analysis.domain_loads(model, init_params(model, jax.random.key(0)), DataConfig(),
                              "validation", 1)


def test_expert_loads_refuse_expert_choice_routing():
  config = dataclasses.replace(presets.get("micro_moe").moe, routing="expert_choice")
  with pytest.raises(ValueError, match="expert_choice"):
    analysis.expert_loads(np.asarray(jax.random.normal(jax.random.key(3), (1, 8, 4))), config)

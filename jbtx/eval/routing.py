"""Routing analysis of an MoE model, per domain and layer (the BTX paper's Figures 3–6).

    stats = routing_statistics(logits, moe)      # logits [layers, tokens, E] of one domain
      top1_load     [layers, E]     fraction of tokens whose highest gate is expert e
      topk_load     [layers, E]     fraction of the T·k assignments expert e receives
      entropy       [layers]        mean entropy of softmax(logits), nats
      confidence    [layers]        mean highest gate value
      co_selection  [layers, E, E]  fraction of tokens routed to both i and j (i = j:
                                    to i, which is k · topk_load)
    per_domain = domain_statistics(model, params, data, "validation", max_batches=4)
    ids, experts, gates = token_experts(model, params, tokenizer, "def f(x):")
    save_statistics(per_domain, directory)      # routing.json and routing.npz

The routing is the model's own (`jbtx.models.routing.route` with its MoE config),
without training-time noise; padding tokens are left out (`expert_usage.router_logits`).
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jbtx import files
from jbtx.config import DataConfig, MoEConfig
from jbtx.data.tokenizers import Tokenizer
from jbtx.eval.expert_usage import domain_router_logits, require_token_choice, router_logits
from jbtx.models import routing

STATISTICS = ("top1_load", "topk_load", "entropy", "confidence", "co_selection")


def _layer_statistics(logits: jax.Array, config: MoEConfig) -> dict[str, jax.Array]:
  n_tokens, n_experts = logits.shape
  choice = routing.route(logits, config)
  gates = routing.gate_matrix(choice, n_experts)  # [T, E]
  chosen = (jnp.sum(jax.nn.one_hot(choice.experts, n_experts), axis=1) > 0) & (gates > 0)
  chosen = chosen.astype(jnp.float32)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  top1 = jax.nn.one_hot(jnp.argmax(gates, axis=-1), n_experts)
  return {"top1_load": jnp.mean(top1, axis=0),
          "topk_load": routing.assignment_fractions(choice, n_experts),
          "entropy": -jnp.mean(jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)),
          "confidence": jnp.mean(jnp.max(gates, axis=-1)),
          "co_selection": chosen.T @ chosen / n_tokens}


def routing_statistics(logits: np.ndarray, config: MoEConfig) -> dict[str, np.ndarray]:
  """The statistics above of router `logits [layers, tokens, E]` (float32 numpy)."""
  require_token_choice(config)
  layers = [_layer_statistics(jnp.asarray(layer, jnp.float32), config) for layer in logits]
  return {name: np.stack([np.asarray(s[name]) for s in layers]) for name in STATISTICS}


def domain_statistics(model: nn.Module, params: Any, data: DataConfig, split: str,
                      max_batches: int) -> dict[str, dict[str, np.ndarray]]:
  """`routing_statistics` of each domain's first `max_batches` evaluation batches."""
  logits = domain_router_logits(model, params, data, split, max_batches)
  return {domain: routing_statistics(values, model.config.moe)
          for domain, values in logits.items()}


def token_experts(model: nn.Module, params: Any, tokenizer: Tokenizer,
                  text: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Each token of `text` (after BOS) and its experts in every layer.

  Returns:
    ids int `[n]`, experts int `[layers, n, k]` and gates float32 `[layers, n, k]`,
    each token's experts in decreasing order of gate value.
  """
  config = model.config.moe
  require_token_choice(config)
  ids = np.asarray(tokenizer.encode(text), np.int32)
  batch = {"tokens": ids[None], "positions": np.arange(len(ids), dtype=np.int32)[None],
           "segment_ids": np.ones((1, len(ids)), np.int32)}
  experts, gates = [], []
  for layer in router_logits(model, params, batch):
    choice = routing.route(jnp.asarray(layer), config)
    order = jnp.argsort(-choice.weights, axis=-1)
    experts.append(np.asarray(jnp.take_along_axis(choice.experts, order, axis=-1)))
    gates.append(np.asarray(jnp.take_along_axis(choice.weights, order, axis=-1)))
  return ids, np.stack(experts), np.stack(gates)


def save_statistics(statistics: Mapping[str, Mapping[str, np.ndarray]],
                    directory: str | pathlib.Path) -> None:
  """Writes `routing.json` (nested lists, by domain) and `routing.npz` (`<domain>/<name>`
  arrays) in `directory`, each atomically."""
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  as_lists = {d: {k: np.asarray(v).tolist() for k, v in s.items()}
              for d, s in statistics.items()}
  files.write_json(directory / "routing.json", as_lists, indent=None)
  arrays = {f"{d}/{k}": np.asarray(v) for d, s in statistics.items() for k, v in s.items()}
  files.write_atomically(directory / "routing.npz", lambda f: np.savez(f, **arrays))


def own_expert_share(statistics: Mapping[str, Mapping[str, np.ndarray]],
                     experts: list[str]) -> dict[str, np.ndarray]:
  """For each domain that names an expert (BTX's mixed experts, in order), the fraction
  of its tokens whose top-1 expert is its own, per layer `[layers]`."""
  return {domain: np.asarray(stats["top1_load"])[:, experts.index(domain)]
          for domain, stats in statistics.items() if domain in experts}

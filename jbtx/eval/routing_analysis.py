"""Routing analysis of a trained MoE model, per domain and layer (the BTX paper's
Figures 3–6): which experts each domain's tokens go to, and how sure the router is.

    logits = router_logits(model, params, batch)          # [layers, tokens, E]
    loads = expert_loads(logits, model.config.moe)        # [layers, E], rows sum to 1
    usage = domain_loads(model, params, data_config, "validation", max_batches=4)
    divergence = load_divergence(usage)                   # {domain: [layers]} in nats
    stats = routing_statistics(logits, moe)               # one domain's logits:
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
without training-time noise (router jitter, Gumbel sampling); padding tokens (segment
id 0) are left out. `notebooks/routing.ipynb` and the eval stage's plots use these.
"""

from __future__ import annotations

import functools
import itertools
import pathlib
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jbtx.config import DataConfig, MoEConfig
from jbtx.data import loader
from jbtx.data.tokenizers import Tokenizer
from jbtx.models import routing
from jbtx.models.moe import collect_router_logits
from jbtx.runtime import files


def router_logits(model: nn.Module, params: Any, batch: Mapping[str, np.ndarray]) -> np.ndarray:
  """Float32 router logits `[layers, real tokens, E]` of a packed batch's real tokens.

  Args:
    model: a jbtx decoder with MoE layers (`Llama` with `config.moe` set).
    params: its parameters.
    batch: `tokens`, `segment_ids` and `positions`, int `[batch, seq]`, as the data
      pipeline yields them.
  """
  logits = np.asarray(_sown_logits(model, params, batch["tokens"], batch["positions"],
                                   batch["segment_ids"]))
  return logits[:, np.asarray(batch["segment_ids"]).reshape(-1) > 0]


@functools.partial(jax.jit, static_argnums=0)
def _sown_logits(model: nn.Module, params: Any, tokens: jax.Array, positions: jax.Array,
                 segment_ids: jax.Array) -> jax.Array:
  _, state = model.apply({"params": params}, tokens, positions, segment_ids,
                         mutable=["intermediates"])
  return collect_router_logits(state["intermediates"])


def require_token_choice(config: MoEConfig | None) -> None:
  """Raises ValueError unless each token's experts follow from its own router logits."""
  if config is None:
    raise ValueError("expert usage: the model has no MoE layers (config.moe is None)")
  if config.routing == "expert_choice":
    raise ValueError("expert usage: with expert_choice routing each expert takes the same "
                     "number of tokens of every group, chosen among all of its tokens; "
                     "loads of a subset of tokens (a domain) are not defined by them alone")


def expert_loads(logits: np.ndarray, config: MoEConfig) -> np.ndarray:
  """Fraction of the routed assignments `[layers, E]` that each expert receives.

  Args:
    logits: router logits `[layers, tokens, E]`.
    config: the MoE config whose routing decides (top-k, softmax-then-top-k, ...).
  """
  require_token_choice(config)
  n_experts = logits.shape[-1]
  fractions = [routing.assignment_fractions(routing.route(layer, config), n_experts)
               for layer in np.asarray(logits, np.float32)]
  return np.stack([np.asarray(f) for f in fractions])


def domain_router_logits(model: nn.Module, params: Any, data: DataConfig, split: str,
                         max_batches: int) -> dict[str, np.ndarray]:
  """Router logits `[layers, real tokens, E]` of each domain of `data`, over its first
  `max_batches` evaluation batches of `split` (as packed for training)."""
  require_token_choice(model.config.moe)  # before any batch is run
  out = {}
  for domain in data.domains:
    batches = itertools.islice(loader.eval_batches(data, split, domain=domain), max_batches)
    logits = [router_logits(model, params, batch) for batch in batches]
    if not logits:
      raise ValueError(f"domain {domain!r} has no {split} documents")
    out[domain] = np.concatenate(logits, axis=1)
  return out


def domain_loads(model: nn.Module, params: Any, data: DataConfig, split: str,
                 max_batches: int) -> dict[str, np.ndarray]:
  """Expert loads `[layers, E]` of each domain of `data` (`domain_router_logits`)."""
  logits = domain_router_logits(model, params, data, split, max_batches)
  return {domain: expert_loads(values, model.config.moe) for domain, values in logits.items()}


def kl_divergence(p: np.ndarray, q: np.ndarray) -> np.ndarray:
  """`KL(p || q)` in nats over the last axis of two distributions; terms with p = 0
  count 0."""
  p, q = np.asarray(p), np.asarray(q)
  with np.errstate(divide="ignore", invalid="ignore"):
    return np.sum(np.where(p > 0, p * np.log(p / q), 0.0), axis=-1)


def load_divergence(loads: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """KL divergence (nats) of each domain's expert load from the mean over domains, per
  layer `[layers]`: 0 when every domain uses the experts alike, larger the more a
  domain has experts of its own."""
  mean = np.mean(np.stack(list(loads.values())), axis=0)
  return {domain: kl_divergence(load, mean) for domain, load in loads.items()}


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

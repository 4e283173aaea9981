"""Which experts a trained MoE model's tokens go to, per layer and per domain.

    logits = router_logits(model, params, batch)          # [layers, tokens, E]
    loads = expert_loads(logits, model.config.moe)        # [layers, E], rows sum to 1
    usage = domain_loads(model, params, data_config, "validation", max_batches=4)
    divergence = load_divergence(usage)                   # {domain: [layers]} in nats
    imbalance = kl_divergence(loads, np.full_like(loads, 1 / E))  # [layers]

The routing of the analysis is the model's own (`routing.route` with its MoE config),
without training-time noise (router jitter, Gumbel sampling). Padding tokens
(segment id 0) are left out. `notebooks/routing.ipynb` plots these.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from jbtx.config import DataConfig, MoEConfig
from jbtx.data import pipeline
from jbtx.models import routing
from jbtx.models.moe import collect_router_logits


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
    batches = itertools.islice(pipeline.eval_batches(data, split, domain=domain), max_batches)
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

"""Routers' decisions and their auxiliary losses, as pure functions of router logits.

A routing is `(experts [T, k] int32, weights [T, k] float32)`: for each token the k
experts it is sent to and the gate values its outputs are combined with, so that

    FF_MoE(x) = Σ_j weights[t, j] · FF_{experts[t, j]}(x).

Variants (`MoEConfig.routing`):

  topk          g = softmax(topk(logits))                   BTX, Mixtral
  softmax_topk  g = topk(softmax(logits)) [/ Σ if renorm]   OLMoE (no renorm)
  switch        top-1 of softmax(logits), weight = its prob  Switch Transformer
  sample_top1   Gumbel-softmax sample (training) / argmax (inference), BTX ablation
  soft          all experts, g = softmax(logits)             BTX "soft routing"
  expert_choice each expert takes the C tokens of its group     Zhou et al. 2022
                with the highest softmax(logits), g = that prob

Load-balancing losses (`MoEConfig.load_balance`, `load_balance_loss`):

  btx     N · Σ_i u_i · p_i, u = mean gate value            BTX; 1 when balanced
  switch  N · Σ_i f_i · p_i, f = fraction of assignments    Switch, OLMoE; 1 when balanced
  cv      CV²(importance) + CV²(load)                        LLaMA-MoE; 0 when balanced

with p the mean router probabilities, importance the summed gate values, load the
tokens per expert (under the noisy gate in training, Shazeer et al. 2017's smooth
estimate `smooth_load`).

Expert choice is expert-major: `expert_choice` returns the `[E, C]` token indices and
gates that `dispatch.expert_choice` consumes; `route` returns the same decision as a
token-major Routing with k = E (gate 0 for experts that did not take the token), which
every other path, the losses and the metrics accept. A token may be taken by any
number of experts, none included; loads are balanced by construction. The choice
depends on every token of the group, later ones included, so it is not causal and
cannot be used for incremental decoding.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jbtx.config import MoEConfig


class Routing(NamedTuple):
  experts: jax.Array  # int32 [tokens, k]
  weights: jax.Array  # float32 [tokens, k]


class ExpertChoice(NamedTuple):
  tokens: jax.Array  # int32 [E, C·groups]: the tokens each expert takes
  gates: jax.Array  # float32 [E, C·groups]: their router probabilities for that expert


def capacity(n_tokens: int, n_experts: int, k: int, factor: float) -> int:
  """Slots per expert for `n_tokens` tokens: `ceil(factor · n_tokens · k / E)`."""
  return max(1, math.ceil(factor * n_tokens * k / n_experts))


def expert_choice_slots(n_tokens: int, config: MoEConfig) -> tuple[int, int]:
  """`(group size S, slots C per expert and group)` of expert-choice routing.

  `C = min(S, ceil(capacity_factor · S · top_k / E))`: on average each token is taken
  by `capacity_factor · top_k` experts (Zhou et al.'s capacity factor c).
  """
  size = min(config.capacity_group_size, n_tokens)
  if n_tokens % size:
    raise ValueError(f"expert-choice routing: {n_tokens} tokens do not split into groups of "
                     f"{size}; set moe.capacity_group_size to a divisor")
  return size, min(size, capacity(size, config.n_experts, config.top_k, config.capacity_factor))


def expert_choice(logits: jax.Array, config: MoEConfig) -> ExpertChoice:
  """Each expert takes the C tokens of each group with the highest router probability.

  Args:
    logits: float32 router logits `[tokens, E]`; tokens are split into consecutive
      groups of `expert_choice_slots(tokens, config)[0]`.
    config: E, top_k, capacity_factor and capacity_group_size.
  """
  n_tokens, n_experts = logits.shape
  size, slots = expert_choice_slots(n_tokens, config)
  groups = n_tokens // size
  probs = jax.nn.softmax(logits, axis=-1).reshape(groups, size, n_experts)
  gates, tokens = jax.lax.top_k(jnp.swapaxes(probs, 1, 2), slots)  # [G, E, C]
  tokens = tokens + (jnp.arange(groups) * size)[:, None, None]
  expert_major = lambda a: jnp.swapaxes(a, 0, 1).reshape(n_experts, groups * slots)
  return ExpertChoice(expert_major(tokens).astype(jnp.int32), expert_major(gates))


def expert_choice_routing(choice: ExpertChoice, n_tokens: int) -> Routing:
  """The expert-major choice as a token-major Routing with k = E (0 where not taken)."""
  n_experts = choice.tokens.shape[0]
  expert = jnp.broadcast_to(jnp.arange(n_experts, dtype=jnp.int32)[:, None], choice.tokens.shape)
  weights = jnp.zeros((n_tokens, n_experts), choice.gates.dtype).at[choice.tokens, expert].set(
      choice.gates, unique_indices=True)
  experts = jnp.broadcast_to(jnp.arange(n_experts, dtype=jnp.int32), (n_tokens, n_experts))
  return Routing(experts, weights)


def untaken_fraction(choice: ExpertChoice, n_tokens: int) -> jax.Array:
  """Fraction of tokens that no expert took (their MoE output is 0)."""
  taken = jnp.zeros((n_tokens,), jnp.int32).at[choice.tokens.reshape(-1)].add(1)
  return jnp.mean((taken == 0).astype(jnp.float32))


def gumbel_temperature(config: MoEConfig, step: jax.Array | None) -> jax.Array:
  """The annealed "sample_top1" temperature `max(τ_min, τ0 · exp(−r · step))`.

  τ0 (`gumbel_temperature`) when `step` is None.
  """
  if step is None:
    return jnp.asarray(config.gumbel_temperature, jnp.float32)
  annealed = config.gumbel_temperature * jnp.exp(
      -config.gumbel_anneal_rate * jnp.asarray(step, jnp.float32))
  return jnp.maximum(config.gumbel_min_temperature, annealed)


def route(logits: jax.Array, config: MoEConfig, rng: jax.Array | None = None,
          temperature: jax.Array | float | None = None) -> Routing:
  """Chooses experts and gate values from float32 router `logits [tokens, E]`.

  Args:
    logits: router logits.
    config: routing variant and k.
    rng: randomness for "sample_top1" in training; None means inference (argmax).
    temperature: Gumbel-softmax temperature of "sample_top1" in training (default:
      `config.gumbel_temperature`; see `gumbel_temperature` for the schedule).
  """
  n_tokens, n_experts = logits.shape
  if config.routing == "topk":
    top_logits, experts = jax.lax.top_k(logits, config.top_k)
    return Routing(experts.astype(jnp.int32), jax.nn.softmax(top_logits, axis=-1))
  probs = jax.nn.softmax(logits, axis=-1)
  if config.routing == "softmax_topk":
    weights, experts = jax.lax.top_k(probs, config.top_k)
    if config.renormalize:
      weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return Routing(experts.astype(jnp.int32), weights)
  if config.routing == "switch":
    weights, experts = jax.lax.top_k(probs, 1)
    return Routing(experts.astype(jnp.int32), weights)
  if config.routing == "sample_top1":
    if rng is None:
      return Routing(jnp.argmax(logits, axis=-1, keepdims=True).astype(jnp.int32),
                     jnp.ones((n_tokens, 1), jnp.float32))
    if temperature is None:
      temperature = config.gumbel_temperature
    noisy = (logits + jax.random.gumbel(rng, logits.shape)) / temperature
    sample = jax.nn.softmax(noisy, axis=-1)
    weights, experts = jax.lax.top_k(sample, 1)
    return Routing(experts.astype(jnp.int32), weights)
  if config.routing == "expert_choice":
    return expert_choice_routing(expert_choice(logits, config), n_tokens)
  if config.routing == "soft":
    experts = jnp.broadcast_to(jnp.arange(n_experts, dtype=jnp.int32), (n_tokens, n_experts))
    return Routing(experts, probs)
  raise ValueError(f"unknown routing {config.routing!r}")


def gate_matrix(routing: Routing, n_experts: int) -> jax.Array:
  """The gate values scattered to `[tokens, E]` (zero for experts not chosen)."""
  one_hot = jax.nn.one_hot(routing.experts, n_experts, dtype=routing.weights.dtype)
  return jnp.einsum("tk,tke->te", routing.weights, one_hot)


def assignment_fractions(routing: Routing, n_experts: int) -> jax.Array:
  """Fraction of the T·k token-to-expert assignments that go to each expert, `[E]`."""
  counts = jnp.sum(jax.nn.one_hot(routing.experts, n_experts, dtype=jnp.float32), axis=(0, 1))
  return counts / routing.experts.size


def load_balance_loss(logits: jax.Array, routing: Routing, kind: str,
                      load: jax.Array | None = None) -> jax.Array:
  """Per-layer load-balancing loss of float32 `logits [T, E]` and their `routing`.

  Kinds "btx" and "switch" are `N · Σ_i a_i · p_i`, equal to 1 when balanced: `p_i`
  is the batch mean of softmax(logits)_i; `a_i` is, for "btx" (BTX paper), the batch
  mean of the gate value g_i; for "switch" (Switch, OLMoE per layer), the fraction of
  assignments routed to expert i.

  Kind "cv" (LLaMA-MoE, after Shazeer et al. 2017) is `CV²(importance) + CV²(load)`,
  equal to 0 when balanced: importance `[E]` is the sum over tokens of the gate
  values; load `[E]` is `load` if given (the noisy gate's smooth estimate,
  `smooth_load`), else the number of tokens with a non-zero gate for each expert.
  """
  n_experts = logits.shape[-1]
  if kind == "cv":
    gates = gate_matrix(routing, n_experts)
    if load is None:
      load = jnp.sum((gates > 0).astype(jnp.float32), axis=0)
    return cv_squared(jnp.sum(gates, axis=0)) + cv_squared(load)
  p = jnp.mean(jax.nn.softmax(logits, axis=-1), axis=0)
  if kind == "btx":
    a = jnp.mean(gate_matrix(routing, n_experts), axis=0)
  elif kind == "switch":
    a = assignment_fractions(routing, n_experts)
  else:
    raise ValueError(f"unknown load-balance kind {kind!r}")
  return n_experts * jnp.sum(a * p)


def cv_squared(x: jax.Array, eps: float = 1e-10) -> jax.Array:
  """Squared coefficient of variation of `x [n]`: `var(x) / (mean(x)² + eps)`.

  The variance is unbiased (n − 1), as torch.var in LLaMA-MoE's `cv_squared`; 0 for
  n = 1.
  """
  x = x.astype(jnp.float32)
  if x.shape[0] == 1:
    return jnp.zeros((), jnp.float32)
  return jnp.var(x, ddof=1) / (jnp.mean(x) ** 2 + eps)


def prob_in_top_k(clean: jax.Array, noisy: jax.Array, noise_std: jax.Array,
                  k: int) -> jax.Array:
  """Probability that each expert is in a token's top-k under re-drawn noise, `[T, E]`.

  Shazeer et al. 2017's `_prob_in_top_k`: `Φ((clean − threshold) / noise_std)`, where
  the threshold is the (k+1)-th largest noisy logit for an expert in the top-k (the
  other noisy logits held fixed, it stays in while its noisy logit beats that one)
  and the k-th largest for an expert outside it. "In" means the expert's noisy logit
  exceeds the (k+1)-th largest, as Shazeer has it; LLaMA-MoE's code compares the
  noise alone (noisy − clean) with that threshold instead.

  Args:
    clean: float32 logits without noise `[T, E]`.
    noisy: `clean` plus the noise the routing used `[T, E]`.
    noise_std: standard deviation of that noise, positive `[T, E]`.
    k: experts per token, k < E.
  """
  top = jax.lax.top_k(noisy, k + 1)[0]
  threshold_if_in, threshold_if_out = top[:, k:k + 1], top[:, k - 1:k]
  is_in = noisy > threshold_if_in
  threshold = jnp.where(is_in, threshold_if_in, threshold_if_out)
  return jax.scipy.stats.norm.cdf((clean - threshold) / noise_std)


def smooth_load(clean: jax.Array, noisy: jax.Array, noise_std: jax.Array,
                k: int) -> jax.Array:
  """Shazeer's differentiable load estimate `[E]`: `prob_in_top_k` summed over tokens."""
  return jnp.sum(prob_in_top_k(clean, noisy, noise_std, k), axis=0)


def router_z_loss(logits: jax.Array) -> jax.Array:
  """ST-MoE router z-loss: `mean(logsumexp(logits)²)`."""
  return jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2)


def hf_load_balancing_loss(layer_logits: jax.Array, top_k: int) -> jax.Array:
  """Hugging Face's `load_balancing_loss_func` (Mixtral, OLMoE), for parity.

  All layers' router logits are pooled before the product, top-k is taken on the
  softmax, and the balanced value is k, not 1.

  Args:
    layer_logits: float `[layers, tokens, E]`.
    top_k: experts per token.
  """
  n_experts = layer_logits.shape[-1]
  logits = layer_logits.reshape(-1, n_experts)
  probs = jax.nn.softmax(logits, axis=-1)
  _, experts = jax.lax.top_k(probs, top_k)
  tokens_per_expert = jnp.mean(jax.nn.one_hot(experts, n_experts), axis=0)  # [k, E]
  return n_experts * jnp.sum(tokens_per_expert * jnp.mean(probs, axis=0)[None])


def router_metrics(logits: jax.Array, routing: Routing) -> dict[str, jax.Array]:
  """Cheap per-layer statistics: expert load `[E]`, router entropy, mean top-1 gate."""
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  entropy = -jnp.mean(jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1))
  return {"expert_load": assignment_fractions(routing, logits.shape[-1]),
          "router_entropy": entropy,
          "top1_gate": jnp.mean(jnp.max(routing.weights, axis=-1))}

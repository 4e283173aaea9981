"""Branch-Train-Merge (Li et al. 2022): N dense experts kept apart, ensembled or averaged.

    ensemble   p(x_t | x_<t) = Σ_j p(x_t | x_<t, D=j) · w_j(x_<t)
    posterior  w_j(x_<t) ∝ p(D=j) · Π_{s<t} p(x_s | x_<s, D=j)   (Bayes, running prior)
    average    θ = Σ_j w_j θ_j  (one dense model)

The posterior starts uniform at each document's first token and is updated with each
expert's likelihood of the document's tokens so far; it is smoothed towards uniform,
`w ← (1 − ε) · w + ε / N`, and only its top-k experts are kept, renormalised
(`top_k_weights`). c-BTM gives the weights instead (`jbtx.methods.clusters`). The functions
here are pure and batched; `generate_ensemble` decodes greedily from the mixture with
one KV cache per expert (the experts' parameters stacked on a leading axis).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jbtx.inference.generate import (
  at_last_prompt_token,
  decode,
  greedy_ragged,
  init_cache,
  prompt_inputs,
)
from jbtx.methods.mix import weighted_mean
from jbtx.models.forward import valid_targets


def top_k_weights(weights: jax.Array, k: int) -> jax.Array:
  """The `k` largest weights of each row `[..., N]` renormalised, the rest 0 (k = 0: all)."""
  n = weights.shape[-1]
  if k == 0 or k >= n:
    return weights / jnp.sum(weights, axis=-1, keepdims=True)
  _, chosen = jax.lax.top_k(weights, k)
  kept = jnp.sum(jax.nn.one_hot(chosen, n, dtype=weights.dtype), axis=-2) * weights
  return kept / jnp.sum(kept, axis=-1, keepdims=True)


def smoothed_posterior(log_likelihoods: jax.Array, smoothing: float) -> jax.Array:
  """`[..., N]` summed log-likelihoods under a uniform prior -> smoothed posterior."""
  n = log_likelihoods.shape[-1]
  return (1.0 - smoothing) * jax.nn.softmax(log_likelihoods, axis=-1) + smoothing / n


def running_posterior(target_log_probs: jax.Array, segment_ids: jax.Array,
                      smoothing: float) -> jax.Array:
  """The domain posterior before each target of packed rows.

  Args:
    target_log_probs: float `[N, batch, seq - 1]`: expert j's log-probability of token
      t + 1 given the tokens up to t (0 where the target is not valid).
    segment_ids: int `[batch, seq]`: the document of each token (0 = padding).
    smoothing: ε of the smoothing towards uniform.

  Returns:
    float `[batch, seq - 1, N]`: the weights for predicting target t, from the valid
    targets before t in the same document (uniform at a document's first target).
  """
  document = segment_ids[:, :-1]
  positions = jnp.arange(document.shape[1])
  starts = jnp.concatenate([jnp.ones_like(document[:, :1], bool),
                            document[:, 1:] != document[:, :-1]], axis=1)
  first = jax.lax.cummax(jnp.where(starts, positions, 0), axis=1)  # [batch, seq - 1]
  before = jnp.cumsum(target_log_probs, axis=-1) - target_log_probs  # exclusive sums
  at_start = jnp.take_along_axis(before, jnp.broadcast_to(first, before.shape), axis=-1)
  return smoothed_posterior(jnp.moveaxis(before - at_start, 0, -1), smoothing)


def ensemble_log_probs(log_probs: jax.Array, weights: jax.Array) -> jax.Array:
  """`log Σ_j w_j p_j`: log-probabilities `[N, ...]` mixed with weights `[..., N]`."""
  log_weights = jnp.where(weights > 0, jnp.log(jnp.where(weights > 0, weights, 1.0)), -jnp.inf)
  return jax.nn.logsumexp(log_probs + jnp.moveaxis(log_weights, -1, 0), axis=0)


def ensemble_loss(target_log_probs: jax.Array, segment_ids: jax.Array,
                  weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Summed negative log-likelihood of the mixture over valid targets, and their count."""
  valid = valid_targets(segment_ids)
  mixed = ensemble_log_probs(target_log_probs, weights)
  return -jnp.sum(jnp.where(valid, mixed, 0.0)), jnp.sum(valid)


def average_params(trees: Sequence[Any], weights: Sequence[float]) -> Any:
  """`Σ_j w_j θ_j / Σ_j w_j` leaf by leaf (numpy, float32 accumulation)."""
  return jax.tree.map(lambda *leaves: weighted_mean(leaves, weights), *trees)


def stack_params(trees: Sequence[Any]) -> Any:
  """The experts' parameter trees stacked on a new leading axis `[N, ...]`."""
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "top_k", "smoothing",
                                             "eos_id"))
def generate_ensemble(model: nn.Module, params: Any, prompts: jax.Array, lengths: jax.Array,
                      max_new_tokens: int, top_k: int = 0, smoothing: float = 0.0,
                      weights: jax.Array | None = None,
                      eos_id: int | None = None) -> jax.Array:
  """Greedy decoding from the ensemble's mixture, prompts of different lengths in lockstep
  (the ragged decoder `jbtx.inference.generate.greedy_ragged`, scoring with the mixture).

  Args:
    model: the experts' decoder.
    params: the N experts' parameters stacked (`stack_params`).
    prompts: int32 `[batch, max_prompt_len]`, right-padded; lengths: int32 `[batch]`.
    max_new_tokens: tokens generated after each prompt.
    top_k: experts kept per token (0 = all).
    smoothing: ε of the posterior's smoothing.
    weights: fixed weights `[batch, N]` (c-BTM); None = the running posterior over the
      prompt's and the generated tokens.
    eos_id: if given, rows that emitted it keep emitting it.

  Returns:
    int32 `[batch, max_new_tokens]`: the tokens after each row's own prompt.
  """
  n = jax.tree.leaves(params)[0].shape[0]
  batch, max_prompt_len = prompts.shape
  # One decode and one cache per expert, not a vmap over them: under vmap each cache's
  # write index is batched, the in-place update becomes a scatter, and every step copies
  # all the caches (7x one expert's decoding time instead of 4x, for 4 tiny experts).
  experts = [jax.tree.map(lambda x, j=j: x[j], params) for j in range(n)]
  caches = [init_cache(model, batch, max_prompt_len + max_new_tokens) for _ in range(n)]

  def mixed(log_probs, log_likelihoods):
    """The mixture `[batch, vocab]` of the experts' next-token `log_probs [N, batch, vocab]`."""
    mixing = weights if weights is not None else smoothed_posterior(log_likelihoods, smoothing)
    return ensemble_log_probs(log_probs, top_k_weights(mixing, top_k)[:, None])

  def prefill(caches, prompts, lengths):
    positions, valid = prompt_inputs(prompts, lengths)
    last, log_likelihoods, new_caches = [], [], []
    for p, c in zip(experts, caches, strict=True):  # one expert's [batch, len, vocab] at a time
      logits, c = decode(model, p, c, prompts, positions, valid)
      log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
      targets = jnp.take_along_axis(log_probs[:, :-1], prompts[:, 1:, None], axis=-1)[..., 0]
      log_likelihoods.append(jnp.sum(jnp.where(valid[:, 1:], targets, 0.0), axis=-1))
      last.append(at_last_prompt_token(log_probs, lengths))
      new_caches.append(c)
    last, log_likelihoods = jnp.stack(last), jnp.stack(log_likelihoods, axis=-1)
    return mixed(last, log_likelihoods), (new_caches, last, log_likelihoods)

  def next_scores(state, token, positions):
    caches, last_log_probs, log_likelihoods = state
    # The posterior takes in the fed token, scored by the previous step.
    log_likelihoods += jnp.take_along_axis(last_log_probs, token[None, :, None],
                                           axis=-1)[..., 0].T
    decoded = [decode(model, p, c, token[:, None], positions[:, None])
               for p, c in zip(experts, caches, strict=True)]
    logits, caches = jnp.stack([d[0] for d in decoded]), [d[1] for d in decoded]
    log_probs = jax.nn.log_softmax(logits[:, :, -1].astype(jnp.float32), axis=-1)
    return mixed(log_probs, log_likelihoods), (caches, log_probs, log_likelihoods)

  return greedy_ragged(prefill, next_scores, caches, prompts, lengths, max_new_tokens, eos_id)


@functools.partial(jax.jit, static_argnames=("model", "top_k", "smoothing"))
def ensemble_target_scores(model: nn.Module, params: Any, tokens: jax.Array,
                           segment_ids: jax.Array, top_k: int = 0,
                           smoothing: float = 0.0) -> tuple[jax.Array, jax.Array]:
  """The ensemble's log-probability of each target and whether it is the mixture's argmax,
  under the running posterior of each row's document (one document per row here).

  Every expert's full next-token distribution is kept (`[N, batch, seq - 1, vocab]`
  floats), which suits evaluation batches of small models; the perplexity rows use
  `running_posterior` on the targets alone.

  Args:
    params: the N experts' parameters stacked (`stack_params`).
    tokens, segment_ids: int `[batch, seq]` (segment 0 = padding).

  Returns:
    float32 `[batch, seq - 1]` and bool `[batch, seq - 1]`.
  """
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)

  def member(expert_params):
    logits = model.apply({"params": expert_params}, tokens, positions=positions,
                         segment_ids=segment_ids)[:, :-1]
    return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)

  log_probs = jax.lax.map(member, params)  # [N, batch, seq - 1, vocab]
  targets = tokens[:, 1:]
  picked = jnp.take_along_axis(log_probs, targets[None, ..., None], axis=-1)[..., 0]
  picked = jnp.where(valid_targets(segment_ids)[None], picked, 0.0)
  weights = top_k_weights(running_posterior(picked, segment_ids, smoothing), top_k)
  mixed = ensemble_log_probs(log_probs, weights[:, :, None, :])  # [batch, seq - 1, vocab]
  chosen = jnp.take_along_axis(mixed, targets[..., None], axis=-1)[..., 0]
  return chosen, jnp.argmax(mixed, axis=-1) == targets

"""Autoregressive generation with a key/value cache.

    tokens = generate(model, params, prompt, max_new_tokens=32, rng=key,
                      temperature=0.8, top_p=0.95)

The prompt is run once (prefill), then one token per step; each step attends to the
cache instead of recomputing the prefix. `temperature=0` is greedy decoding.
`generate_ragged` decodes greedily a batch of prompts of different lengths, with
`greedy_ragged`, the one ragged decoding loop (BTM's ensembles use it too): the
right-padded prompts are prefilled in one call, their padding marked invalid in the
cache, then every row continues from its own length.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Cache = Any


def init_cache(model: nn.Module, batch: int, cache_len: int) -> Cache:
  """A zeroed KV cache for `batch` sequences of up to `cache_len` tokens."""
  decoder = model.clone(decode=True)
  tokens = jnp.zeros((batch, cache_len), jnp.int32)

  def init():
    return decoder.init(jax.random.key(0), tokens, positions=tokens)["cache"]

  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(init))


@functools.partial(jax.jit, static_argnames="model")
def decode(model: nn.Module, params: Any, cache: Cache, tokens: jax.Array,
           positions: jax.Array, valid: jax.Array | None = None) -> tuple[jax.Array, Cache]:
  """Appends `tokens [batch, n]` at `positions [batch, n]` to the cache.

  Args:
    valid: bool `[batch, n]`, False for padding that later tokens must not attend to;
      None: all valid.

  Returns:
    float32 logits `[batch, n, vocab]` for the new tokens, and the updated cache.
  """
  segment_ids = None if valid is None else valid.astype(jnp.int32)
  logits, variables = model.clone(decode=True).apply(
      {"params": params, "cache": cache}, tokens, positions=positions,
      segment_ids=segment_ids, mutable=["cache"])
  return logits, variables["cache"]


def sample(logits: jax.Array, rng: jax.Array, temperature: float, top_p: float) -> jax.Array:
  """Draws one token per row of `logits [batch, vocab]` (greedy when temperature == 0).

  Nucleus sampling keeps the smallest set of most likely tokens whose probability
  reaches `top_p` (always at least the most likely one).
  """
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    # Number of tokens needed to reach top_p; the threshold is the smallest kept logit.
    keep = jnp.sum(cumulative - jax.nn.softmax(sorted_logits, axis=-1) < top_p, axis=-1)
    threshold = jnp.take_along_axis(sorted_logits, keep[:, None] - 1, axis=-1)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "temperature", "top_p",
                                             "eos_id"))
def generate(model: nn.Module, params: Any, prompt: jax.Array, max_new_tokens: int,
             rng: jax.Array, temperature: float = 0.0, top_p: float = 1.0,
             eos_id: int | None = None) -> jax.Array:
  """Continues each row of `prompt`.

  Args:
    model: a decoder (e.g. `jbtx.models.llama.Llama`) with a `decode` attribute.
    params: its parameters.
    prompt: int32 `[batch, prompt_len]`; all rows have the same length.
    max_new_tokens: number of tokens to append.
    rng: PRNG key for sampling.
    temperature: softmax temperature; 0 for greedy decoding.
    top_p: nucleus-sampling mass in (0, 1].
    eos_id: if given, rows that emitted it keep emitting it.

  Returns:
    int32 `[batch, prompt_len + max_new_tokens]`: the prompt followed by the new tokens.
  """
  batch, prompt_len = prompt.shape
  cache = init_cache(model, batch, prompt_len + max_new_tokens)
  positions = jnp.broadcast_to(jnp.arange(prompt_len), prompt.shape)
  logits, cache = decode(model, params, cache, prompt, positions)
  rngs = jax.random.split(rng, max_new_tokens)
  first = sample(logits[:, -1], rngs[0], temperature, top_p)
  done = jnp.zeros((batch,), bool) if eos_id is None else first == eos_id

  def step(carry, inputs):
    cache, token, done = carry
    rng, position = inputs
    logits, cache = decode(model, params, cache, token[:, None],
                           jnp.full((batch, 1), position, jnp.int32))
    next_token = sample(logits[:, -1], rng, temperature, top_p)
    if eos_id is not None:
      next_token = jnp.where(done, eos_id, next_token)
      done = done | (next_token == eos_id)
    return (cache, next_token, done), next_token

  positions = prompt_len + jnp.arange(max_new_tokens - 1)
  _, rest = jax.lax.scan(step, (cache, first, done), (rngs[1:], positions))
  return jnp.concatenate([prompt, first[:, None], rest.T], axis=1).astype(jnp.int32)


Prefill = Callable[[Any, jax.Array, jax.Array], tuple[jax.Array, Any]]
NextScores = Callable[[Any, jax.Array, jax.Array], tuple[jax.Array, Any]]


def prompt_inputs(prompts: jax.Array, lengths: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Rotary positions `[batch, max_prompt_len]` (0, 1, … per row) and the mask of each
  row's real tokens (bool, same shape) of right-padded `prompts`."""
  positions = jnp.broadcast_to(jnp.arange(prompts.shape[1]), prompts.shape)
  return positions, positions < lengths[:, None]


def at_last_prompt_token(values: jax.Array, lengths: jax.Array) -> jax.Array:
  """`values [..., batch, max_prompt_len, d]` at each row's last prompt token ->
  `[..., batch, d]`."""
  index = jnp.broadcast_to((lengths - 1)[:, None, None], (*values.shape[:-2], 1, 1))
  return jnp.take_along_axis(values, index, axis=-2)[..., 0, :]


def greedy_ragged(prefill: Prefill, next_scores: NextScores, state: Any, prompts: jax.Array,
                  lengths: jax.Array, max_new_tokens: int,
                  eos_id: int | None = None) -> jax.Array:
  """The greedy decoding loop for prompts of different lengths, all rows in lockstep.

  `prefill` runs the right-padded prompts in one call (their padding written to the
  cache as invalid slots); each of the `max_new_tokens - 1` steps then feeds every row's
  previous token at the row's own next position, into the cache slot the rows share.
  What scores the next token is the caller's: one model (`generate_ragged`) or an
  ensemble (`jbtx.methods.btm.generate_ensemble`). Call it inside `jax.jit`.

  Args:
    prefill: `(state, prompts, lengths) -> (scores [batch, vocab], state)`: the scores
      of the token after each row's last prompt token (logits or log-probs; the argmax
      is taken).
    next_scores: `(state, tokens [batch], positions [batch]) -> (scores, state)`: feeds
      each row's token at its position and scores the next one.
    state: the initial state (e.g. an empty KV cache of `max_prompt_len +
      max_new_tokens - 1` slots or more).
    prompts: int32 `[batch, max_prompt_len]`, right-padded (padding is never attended to).
    lengths: int32 `[batch]`, each prompt's length (at least 1).
    max_new_tokens: number of tokens to generate after each prompt (at least 1).
    eos_id: if given, rows that emitted it keep emitting it.

  Returns:
    int32 `[batch, max_new_tokens]`: the tokens generated after each row's own prompt.
  """
  scores, state = prefill(state, prompts.astype(jnp.int32), lengths)
  first = jnp.argmax(scores, axis=-1).astype(jnp.int32)
  done = jnp.zeros_like(first, bool) if eos_id is None else first == eos_id

  def step(carry, offset):
    state, token, done = carry
    scores, state = next_scores(state, token, lengths + offset)
    next_token = jnp.argmax(scores, axis=-1).astype(jnp.int32)
    if eos_id is not None:
      next_token = jnp.where(done, eos_id, next_token)
      done = done | (next_token == eos_id)
    return (state, next_token, done), next_token

  _, rest = jax.lax.scan(step, (state, first, done), jnp.arange(max_new_tokens - 1))
  return jnp.concatenate([first[:, None], rest.T], axis=1)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "eos_id"))
def generate_ragged(model: nn.Module, params: Any, prompts: jax.Array, lengths: jax.Array,
                    max_new_tokens: int, eos_id: int | None = None) -> jax.Array:
  """Greedily continues prompts of different lengths with one KV cache (`greedy_ragged`).

  Args:
    model: a decoder (e.g. `jbtx.models.llama.Llama`) with a `decode` attribute.
    params: its parameters.
    prompts: int32 `[batch, max_prompt_len]`, right-padded; lengths: int32 `[batch]`.
    max_new_tokens: number of tokens to generate after each prompt (at least 1).
    eos_id: if given, rows that emitted it keep emitting it.

  Returns:
    int32 `[batch, max_new_tokens]`: the tokens generated after each row's own prompt.
  """
  batch, max_prompt_len = prompts.shape

  def prefill(cache, prompts, lengths):
    positions, valid = prompt_inputs(prompts, lengths)
    logits, cache = decode(model, params, cache, prompts, positions, valid)
    return at_last_prompt_token(logits, lengths), cache

  def next_scores(cache, token, positions):
    logits, cache = decode(model, params, cache, token[:, None], positions[:, None])
    return logits[:, -1], cache

  cache = init_cache(model, batch, max_prompt_len + max_new_tokens)
  return greedy_ragged(prefill, next_scores, cache, prompts, lengths, max_new_tokens, eos_id)

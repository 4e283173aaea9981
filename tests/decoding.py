"""Shared test helper: run a decoder through its KV cache a few tokens at a time."""

import jax.numpy as jnp

from jbtx.inference import generate as gen


def decode_in_steps(model, params, tokens, prefill: int, cache_len: int):
  """Logits `[batch, seq, vocab]` from prefilling `prefill` tokens, then one per call."""
  batch, seq = tokens.shape
  cache = gen.init_cache(model, batch=batch, cache_len=cache_len)
  positions = jnp.broadcast_to(jnp.arange(seq), tokens.shape)
  logits, cache = gen.decode(model, params, cache, tokens[:, :prefill], positions[:, :prefill])
  steps = [logits]
  for t in range(prefill, seq):
    logits, cache = gen.decode(model, params, cache, tokens[:, t:t + 1], positions[:, t:t + 1])
    steps.append(logits)
  return jnp.concatenate(steps, axis=1)

r"""Ragged greedy decoding with a batched prefill against a prefill of one token per step.

    python benchmarks/ragged_decoding.py [--preset=demo] [--batch=16] [--new_tokens=64]

The prompts are the demo's math task prompts (`Problem: … Solution:`, byte tokens,
right-padded to a multiple of 32 as `jbtx.eval.tasks` pads them) and the model a
randomly initialised `--preset`. Both decoders run `--repeats` times after compiling;
the baseline feeds every row one token per `lax.scan` step (its prompt token while the
prompt lasts, its previous greedy token after), which is how `greedy_ragged` prefilled
before it prefilled in one call. Prints the seconds per batch of each, their ratio,
and whether the generated tokens agree (they must: the same greedy decoding).
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from jbtx.data import demo
from jbtx.data.tokenizers import ByteTokenizer
from jbtx.eval.tasks import batch_prompts
from jbtx.inference.generate import decode, generate_ragged, init_cache
from jbtx.models import presets
from jbtx.models.llama import Llama, init_params


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens"))
def token_by_token(model: Llama, params, prompts: jax.Array, lengths: jax.Array,
                   max_new_tokens: int) -> jax.Array:
  """The baseline: greedy ragged decoding with no prefill, `[batch, max_new_tokens]`."""
  batch, max_prompt_len = prompts.shape
  inputs = jnp.pad(prompts, ((0, 0), (0, max_new_tokens - 1)))

  def step(carry, xs):
    cache, previous = carry
    t, prompt_token = xs
    token = jnp.where(t < lengths, prompt_token, previous)
    logits, cache = decode(model, params, cache, token[:, None],
                           jnp.full((batch, 1), t, jnp.int32))
    next_token = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    return (cache, next_token), next_token

  cache = init_cache(model, batch, max_prompt_len + max_new_tokens)
  steps = jnp.arange(max_prompt_len + max_new_tokens - 1)
  _, predicted = jax.lax.scan(step, (cache, jnp.zeros((batch,), jnp.int32)),
                              (steps, inputs.T))
  index = lengths[:, None] - 1 + jnp.arange(max_new_tokens)
  return jnp.take_along_axis(predicted.T, index, axis=1)


def seconds_per_batch(decoder, repeats: int) -> tuple[float, np.ndarray]:
  """Mean wall-clock seconds of `decoder()` after one compiling call, and its output."""
  out = np.asarray(decoder())
  start = time.perf_counter()
  for _ in range(repeats):
    out = np.asarray(decoder())
  return (time.perf_counter() - start) / repeats, out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--preset", default="demo", choices=presets.names())
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--new_tokens", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  config = presets.get(args.preset)
  if config.vocab_size < 259:
    parser.error(f"--preset={args.preset} has {config.vocab_size} tokens; byte prompts "
                 "need 259")
  model = Llama(config)
  params = init_params(model, jax.random.key(0))
  tasks = demo.tasks("math", "validation", demo.data_dir())[:args.batch]
  tokens, lengths = batch_prompts(ByteTokenizer(), [t["prompt"] for t in tasks])
  tokens, lengths = jnp.asarray(tokens), jnp.asarray(lengths)
  print(f"{args.preset}: {len(tasks)} math prompts of {int(lengths.min())}-"
        f"{int(lengths.max())} tokens padded to {tokens.shape[1]}, {args.new_tokens} new "
        f"tokens, {jax.devices()[0].platform}")
  batched, ours = seconds_per_batch(
      lambda: generate_ragged(model, params, tokens, lengths, args.new_tokens), args.repeats)
  baseline, theirs = seconds_per_batch(
      lambda: token_by_token(model, params, tokens, lengths, args.new_tokens), args.repeats)
  print(f"batched prefill  {batched:.3f} s/batch")
  print(f"token by token   {baseline:.3f} s/batch")
  print(f"ratio (token by token / batched prefill): {baseline / batched:.2f}; same tokens: "
        f"{bool((ours == theirs).all())}")


if __name__ == "__main__":
  main()

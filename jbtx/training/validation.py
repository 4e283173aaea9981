"""Evaluation during and after training: validation loss per domain, and a sample."""

from __future__ import annotations

import itertools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jbtx.config import ExperimentConfig
from jbtx.data import loader
from jbtx.inference.generate import generate
from jbtx.models.llama import Llama
from jbtx.runtime import sharding


def domain_loss(params: Any, config: ExperimentConfig, mesh: Mesh, eval_step: Any,
                 domain: str) -> tuple[float, float]:
  """Summed loss and target count over `train.eval_batches` validation batches of `domain`."""
  batches = loader.eval_batches(config.data, "validation", domain=domain,
                                  process_index=jax.process_index(),
                                  process_count=jax.process_count())
  total = count = 0.0
  for batch in itertools.islice(batches, config.train.eval_batches):
    loss_sum, n = eval_step(params, sharding.global_batch(mesh, batch))
    total, count = total + float(loss_sum), count + float(n)
  if count == 0:
    raise ValueError(f"the validation split of domain {domain!r} yielded no targets; "
                     "check config key 'data.domains'")
  return total, count


def evaluate(params: Any, config: ExperimentConfig, mesh: Mesh,
             eval_step: Any) -> dict[str, Any]:
  """Validation loss (nats/token) per domain and overall, perplexity, bits per token.

  Each domain contributes `train.eval_batches` batches; the overall loss weighs the
  domains by their target tokens.

  Args:
    params: the (sharded) parameters.
    eval_step: `make_eval_step(model, mesh)`: `(params, batch) -> (loss sum, count)`.
  """
  sums = {d: domain_loss(params, config, mesh, eval_step, d) for d in config.data.domains}
  loss = sum(s for s, _ in sums.values()) / sum(n for _, n in sums.values())
  return {"loss": loss, "perplexity": math.exp(loss), "bits_per_token": loss / math.log(2),
          "domains": {d: s / n for d, (s, n) in sums.items()}}


def sample_text(model: Llama, params: Any, config: ExperimentConfig) -> str:
  """A continuation of `train.sample_prompt` at `train.sample_temperature`.

  Generation runs on each process's first device, on a host copy of `params`.
  """
  if config.train.sample_tokens == 0:
    return ""
  params = sharding.host_params(params)
  tokenizer = loader.make_tokenizer(config.data)
  prompt = jnp.asarray(tokenizer.encode(config.train.sample_prompt))[None]
  tokens = generate(model, params, prompt, config.train.sample_tokens,
                    jax.random.key(config.seed), temperature=config.train.sample_temperature,
                    top_p=0.95, eos_id=tokenizer.eos_id)
  return tokenizer.decode(tokens[0])

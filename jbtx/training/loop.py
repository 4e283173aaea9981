"""Training a dense decoder from scratch on the configured corpus (the seed stage)."""

from __future__ import annotations

import itertools
import math
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from jbtx import checkpoint, parallel
from jbtx.config import ExperimentConfig
from jbtx.data import pipeline
from jbtx.data.tokenizers import ByteTokenizer
from jbtx.eval.generate import generate
from jbtx.models.llama import Llama
from jbtx.training.optimizer import learning_rate_schedule, make_optimizer
from jbtx.training.step import init_train_state, make_eval_step, make_train_step


def evaluate(model: Llama, params: Any, config: ExperimentConfig) -> dict[str, float]:
  """Validation loss (nats/token), perplexity and bits per byte over `eval_batches`."""
  tokenizer = ByteTokenizer()
  batches = pipeline.document_batches(pipeline.documents(config.data, "validation"), tokenizer,
                                      config.data.seq_len, config.data.batch_size, seed=None)
  mesh = parallel.make_mesh(config.mesh)
  eval_step = make_eval_step(model, mesh)
  total = count = 0.0
  for batch in itertools.islice(batches, config.train.eval_batches):
    loss_sum, n = eval_step(params, parallel.global_batch(mesh, batch))
    total, count = total + float(loss_sum), count + float(n)
  if count == 0:
    raise ValueError("the validation split yielded no full batch; lower data.batch_size "
                     "or data.seq_len")
  loss = total / count
  return {"loss": loss, "perplexity": math.exp(loss), "bits_per_byte": loss / math.log(2)}


def sample_text(model: Llama, params: Any, config: ExperimentConfig) -> str:
  """A continuation of `train.sample_prompt` at `train.sample_temperature`."""
  if config.train.sample_tokens == 0:
    return ""
  tokenizer = ByteTokenizer()
  prompt = jnp.asarray(tokenizer.encode(config.train.sample_prompt))[None]
  tokens = generate(model, params, prompt, config.train.sample_tokens,
                    jax.random.key(config.seed), temperature=config.train.sample_temperature,
                    top_p=0.95, eos_id=tokenizer.eos_id)
  return tokenizer.decode(tokens[0])


def train_dense(config: ExperimentConfig, output: pathlib.Path, stage: str) -> dict[str, Any]:
  """Trains `config.model` from a random init and saves it as a jbtx checkpoint at `output`.

  Returns the metrics that are also recorded in the checkpoint's `jbtx.json`.
  """
  model = Llama(config.model)
  steps = config.train.steps
  optimizer = make_optimizer(config.optimizer, steps)
  schedule = learning_rate_schedule(config.optimizer, steps)
  mesh = parallel.make_mesh(config.mesh)
  state = init_train_state(model, optimizer, config.seed, mesh)
  train_step = make_train_step(model, optimizer, mesh, config.optimizer.grad_accum_steps)
  batches = pipeline.document_batches(pipeline.documents(config.data, "train"), ByteTokenizer(),
                                      config.data.seq_len, config.data.batch_size,
                                      seed=config.seed)
  print(f"[{stage}] {config.model.num_params() / 1e6:.2f}M parameters, {steps} steps of "
        f"{config.data.batch_size}x{config.data.seq_len} tokens")
  initial = evaluate(model, state.params, config)
  window: list[dict[str, jax.Array]] = []
  window_start = time.perf_counter()
  with tqdm.tqdm(total=steps, desc=stage, unit="step", dynamic_ncols=True) as bar:
    for step in range(1, steps + 1):
      state, metrics = train_step(state, parallel.global_batch(mesh, next(batches)))
      window.append(metrics)
      bar.update()
      if step % config.train.log_every == 0 or step == steps:
        mean = {k: float(np.mean([m[k] for m in jax.device_get(window)]))
                for k in ("loss", "aux_loss", "grad_norm")}
        if not np.isfinite(mean["loss"]):
          raise FloatingPointError(f"[{stage}] loss is {mean['loss']} at step {step}; "
                                   "lower optimizer.learning_rate")
        rate = len(window) * config.data.batch_size * config.data.seq_len / (
            time.perf_counter() - window_start)
        aux = ""
        if config.model.moe:  # Expert load range over layers and experts (balanced: 1/E).
          load = np.mean([m["expert_load"] for m in jax.device_get(window)], axis=0)
          aux = (f"aux {mean['aux_loss']:.4f}  expert load {load.min():.3f}-"
                 f"{load.max():.3f}  ")
        bar.write(f"[{stage}] step {step:5d}  loss {mean['loss']:.4f}  {aux}"
                  f"grad_norm {mean['grad_norm']:.3f}  lr {float(schedule(step - 1)):.2e}  "
                  f"{rate:,.0f} tokens/s")
        window, window_start = [], time.perf_counter()
  final = evaluate(model, state.params, config)
  sample = sample_text(model, state.params, config)
  result = {"steps": steps, "validation_before": initial, "validation": final,
            "sample": sample}
  print(f"[{stage}] validation loss {initial['loss']:.3f} -> {final['loss']:.3f} nats/byte "
        f"({final['bits_per_byte']:.3f} bits/byte, perplexity {final['perplexity']:.2f})")
  print(f"[{stage}] sample: {sample!r}")
  checkpoint.save(output, config.model, jax.device_get(state.params),
                  extra={"stage": stage, "metrics": result})
  print(f"[{stage}] wrote {output}")
  return result

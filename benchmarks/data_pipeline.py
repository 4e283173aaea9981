r"""Throughput of the data pipeline relative to training the demo model on the same machine.

    python benchmarks/data_pipeline.py [--steps=200] [--train_steps=10]

Measures the training pipeline of `configs/btx.py` (four demo domains, byte tokens,
shuffle + tokenize + pack + mix + batch, no prefetch thread) in tokens per second of
one core's CPU time (the calling thread's), then the tiny demo model's training
tokens per second (`jbtx.training.step.make_train_step`, wall clock, compiled, all
cores; freed host memory reused as in `jbtx.train`), and prints their ratio.
Target: ratio >= 10, so the pipeline is never the bottleneck. The demo data is built
into the data dir first if absent (not timed).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import pathlib
import time

import jax

from jbtx.config import ExperimentConfig, MeshConfig, from_mapping
from jbtx.data import loader
from jbtx.models.llama import Llama
from jbtx.runtime import host_memory
from jbtx.runtime.sharding import make_mesh
from jbtx.training.optimizer import make_optimizer
from jbtx.training.step import init_train_state, make_train_step


def demo_config() -> ExperimentConfig:
  """`configs/btx.py`, validated."""
  path = pathlib.Path(__file__).resolve().parents[1] / "configs" / "btx.py"
  spec = importlib.util.spec_from_file_location("btx_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return from_mapping(ExperimentConfig, module.get_config())


def pipeline_tokens_per_second(config: ExperimentConfig, steps: int) -> float:
  """Tokens per second of one core's CPU time for `steps` batches."""
  data = loader.train_iterator(dataclasses.replace(config.data, prefetch=0),
                                 seed=config.seed)
  next(data)  # Opens and indexes the sources.
  start = time.thread_time()
  for _ in range(steps):
    next(data)
  return steps * config.data.batch_size * config.data.seq_len / (time.thread_time() - start)


def training_tokens_per_second(config: ExperimentConfig, steps: int) -> float:
  """Wall-clock training tokens per second of `config.model` after compilation."""
  model = Llama(config.model)
  optimizer = make_optimizer(config.optimizer, config.train.steps)
  mesh = make_mesh(MeshConfig())
  state = init_train_state(model, optimizer, config.seed, mesh)
  train_step = make_train_step(model, optimizer, mesh)
  data = loader.train_iterator(config.data, seed=config.seed)
  batches = [next(data) for _ in range(steps + 1)]
  state, metrics = train_step(state, batches[0])  # Compiles.
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for batch in batches[1:]:
    state, metrics = train_step(state, batch)
  jax.block_until_ready(metrics)
  return steps * config.data.batch_size * config.data.seq_len / (time.perf_counter() - start)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=200, help="pipeline batches timed")
  parser.add_argument("--train_steps", type=int, default=10, help="training steps timed")
  parser.add_argument("--reuse-host-memory", action=argparse.BooleanOptionalAction, default=True,
                      help="glibc keeps freed blocks for reuse, as jbtx.train does "
                           "(jbtx.runtime.host_memory)")
  args = parser.parse_args()
  if args.reuse_host_memory:  # Before JAX starts its threads.
    host_memory.reuse_freed_blocks()
  config = demo_config()
  shape = f"{config.data.batch_size}x{config.data.seq_len}"
  data_rate = pipeline_tokens_per_second(config, args.steps)
  print(f"pipeline (one core): {data_rate:,.0f} tokens/s over {args.steps} batches of {shape}")
  train_rate = training_tokens_per_second(config, args.train_steps)
  print(f"training ({config.model.num_params() / 1e6:.2f}M-parameter demo model, "
        f"{jax.device_count()} {jax.default_backend()} devices): {train_rate:,.0f} tokens/s")
  print(f"ratio pipeline / training: {data_rate / train_rate:.1f} (target >= 10)")


if __name__ == "__main__":
  main()

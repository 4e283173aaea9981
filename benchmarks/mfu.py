r"""Model FLOPs utilisation of the jbtx train step: an MoE model and its dense equivalent.

    python benchmarks/mfu.py [--batch=8] [--seq=2048] [--steps=10] [--dtype=bfloat16]

The default shape is a ~1.2B-parameter MoE (0.48B active): vocab 32000, d_model 1536,
16 layers, 12 heads, 8 experts of width 1536, top-2 ("topk" routing, load balancing
0.01), bfloat16 compute with float32 parameters. The dense equivalent replaces every
MoE layer by one SwiGLU of width k·d_ff (the same active FLOPs). Each is trained with
`make_train_step` (AdamW, clipping, the default dispatch for the backend) on random
tokens, on all local devices with the default mesh (`MeshConfig()`: data parallel,
so the global batch must divide by the device count).

MFU = tokens/s × model FLOPs per token ÷ (devices × peak FLOP/s), with FLOPs per token
from `jbtx.training.metrics.train_flops_per_token` (6 × active matmul parameters +
causal attention) and the peak from the device kind (`metrics.PEAK_FLOPS`: dense bf16)
or `--peak-tflops`. Target on a GPU: >= 40% for the MoE model. Every size is a flag,
so the same script runs a tiny model on CPU (give `--peak-tflops` there).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

from jbtx.config import MeshConfig, ModelConfig, MoEConfig, OptimizerConfig
from jbtx.models.llama import Llama
from jbtx.runtime import sharding
from jbtx.training import metrics
from jbtx.training.optimizer import make_optimizer
from jbtx.training.step import init_train_state, make_train_step


def model_config(args: argparse.Namespace, moe: bool) -> ModelConfig:
  """The benchmarked MoE model, or (`moe=False`) its dense equivalent."""
  return ModelConfig(
      vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
      n_kv_heads=args.heads, d_ff=args.d_ff if moe else args.d_ff * args.top_k,
      max_seq_len=args.seq, dtype=args.dtype, param_dtype="float32",
      remat_policy=args.remat,
      moe=MoEConfig(n_experts=args.experts, top_k=args.top_k) if moe else None)


def tokens_per_second(config: ModelConfig, args: argparse.Namespace) -> float:
  """Median training throughput of `config` over `args.steps` steps after warm-up."""
  model = Llama(config)
  optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-4, warmup_steps=0), 1000)
  mesh = sharding.make_mesh(MeshConfig())
  train_step = make_train_step(model, optimizer, mesh)
  tokens = np.random.default_rng(0).integers(0, config.vocab_size, (args.batch, args.seq),
                                             dtype=np.int32)
  batch = sharding.global_batch(mesh, {
      "tokens": tokens, "segment_ids": np.ones_like(tokens),
      "positions": np.broadcast_to(np.arange(args.seq, dtype=np.int32), tokens.shape)})
  state = init_train_state(model, optimizer, 0, mesh)
  times = []
  for i in range(args.warmup + args.steps):
    start = time.perf_counter()
    state, step_metrics = train_step(state, batch)
    jax.block_until_ready(step_metrics)
    if i >= args.warmup:
      times.append(time.perf_counter() - start)
  return tokens.size / statistics.median(times)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batch", type=int, default=8, help="global batch (rows)")
  parser.add_argument("--seq", type=int, default=2048)
  parser.add_argument("--vocab", type=int, default=32000)
  parser.add_argument("--d-model", type=int, default=1536)
  parser.add_argument("--layers", type=int, default=16)
  parser.add_argument("--heads", type=int, default=12)
  parser.add_argument("--d-ff", type=int, default=1536, help="width of each expert")
  parser.add_argument("--experts", type=int, default=8)
  parser.add_argument("--top-k", type=int, default=2)
  parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  parser.add_argument("--remat", default="none", choices=["none", "full", "dots",
                                                          "dots_no_batch"])
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps (compilation)")
  parser.add_argument("--peak-tflops", type=float, default=0.0,
                      help="peak TFLOP/s of one device (default: from the device kind)")
  args = parser.parse_args()
  if args.batch % jax.device_count():
    parser.error(f"--batch={args.batch} must be divisible by the {jax.device_count()} devices "
                 "(the default mesh is data parallel over all of them)")
  device = jax.devices()[0]
  peak = metrics.peak_flops(device.device_kind, args.peak_tflops * 1e12)
  if peak is None:
    parser.error(f"no peak FLOP/s known for device kind {device.device_kind!r}; "
                 "give --peak-tflops")
  print(f"{jax.device_count()} x {device.device_kind}, peak {peak / 1e12:.4g} TFLOP/s each, "
        f"batch {args.batch}x{args.seq}, {args.dtype}, remat {args.remat}, jax {jax.__version__}")
  results = {}
  for name, moe in (("MoE", True), ("dense equivalent", False)):
    config = model_config(args, moe)
    flops = metrics.train_flops_per_token(config, args.seq)
    rate = tokens_per_second(config, args)
    results[name] = metrics.mfu(rate, flops, jax.device_count(), peak)
    print(f"{name:<17} {config.num_params() / 1e6:8,.1f}M params "
          f"({config.num_active_params() / 1e6:,.1f}M active), {rate:12,.0f} tokens/s, "
          f"{rate * flops / jax.device_count() / 1e12:8.4g} TFLOP/s/device, "
          f"MFU {100 * results[name]:5.1f}%")
  print(f"MoE MFU / dense MFU: {results['MoE'] / results['dense equivalent']:.2f} "
        "(target: MoE MFU >= 40% on a GPU)")


if __name__ == "__main__":
  main()

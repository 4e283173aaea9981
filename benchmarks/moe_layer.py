r"""Forward+backward time of the MoE layer relative to a dense FFN of the same active size.

    python benchmarks/moe_layer.py [--config=both] [--dtype=float32] [--repeats=5]

Configurations (both by default): "mixtral" (E=8, k=2, d_ff=1408) and "olmoe" (E=64,
k=8, d_ff=176, fine-grained experts), with tokens=8192 and d_model=512; every size
can be overridden.

The layer under test is the router matmul (float32 logits), `routing.route` with
routing="topk", and one dispatch path of `jbtx.models.dispatch`. The baseline is a
dense SwiGLU of hidden width k·d_ff, `(silu(x @ W_gate) * (x @ W_up)) @ W_down`: the
same active parameters and FLOPs. Both are timed as
`jax.jit(jax.value_and_grad(loss, argnums=<all parameters and x>))` with
`loss = sum(out * c)` for a fixed random `c`, after one warm-up call (compilation),
with `block_until_ready`. The timed calls alternate baseline and path, so that both
see the same machine load; a path's ratio is the median of its times over the median
of the baseline times interleaved with it. A path stops repeating once it has used
`--max-seconds` (after at least one timed call). "*" marks the path that
`dispatch="auto"` resolves to. The target is a ratio <= 1.3 for that path; ideal is
1.0, and dense (every expert on every token) costs about E/k. Two last rows time
the experts alone at perfect balance, on exactly T·k/E contiguous rows each (no
routing, no gather or scatter): "(balanced)" as E batched SwiGLUs, "(scanned)" one
expert after another with gate and up fused, as the blocked path runs them. They are
what the experts' SwiGLUs (matmuls and elementwise work) cost at these shapes, a floor
no exact path can beat by much. "expert_choice" is a different routing at the same
compute (each expert takes C = T·k/E tokens per group; `routing.expert_choice`).

The process keeps freed host memory for reuse (`jbtx.runtime.host_memory`, as `jbtx.train`
does); `--no-reuse-host-memory` keeps glibc's defaults.

Active FLOPs of forward+backward, used for TFLOP/s: 6 · tokens · d_model · 3·k·d_ff
(three matmuls of 2 · tokens · d_model · k·d_ff forward, twice that backward). The
router (6 · tokens · d_model · E), the elementwise work and FLOPs wasted by a path
(dense computes all E experts, capacity pads to C slots) are not counted.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jbtx.config import ModelConfig, MoEConfig
from jbtx.models import dispatch, moe, routing
from jbtx.runtime import host_memory

CONFIGS = {
    "mixtral": {"n_experts": 8, "top_k": 2, "d_ff": 1408},
    "olmoe": {"n_experts": 64, "top_k": 8, "d_ff": 176},
}
PATHS = ("blocked", "dropless", "capacity", "dense", "loop", "expert_choice")


def _normal(key: jax.Array, shape: tuple[int, ...], dtype, fan_in: int) -> jax.Array:
  return (jax.random.normal(key, shape) / fan_in**0.5).astype(dtype)


def _timed(fn: Callable, args: tuple) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def _cpu_ragged_dot_gigabytes(rows: int, n_experts: int, d: int, f: int, dtype) -> float:
  """Size of the `[E, rows, width]` operands XLA:CPU builds for `ragged_dot` (0 elsewhere)."""
  if jax.default_backend() != "cpu":
    return 0.0
  return n_experts * rows * (2 * f + d) * jnp.dtype(dtype).itemsize / 1e9


def _interleaved(step: Callable, step_args: tuple, baseline: Callable, baseline_args: tuple,
                 args: argparse.Namespace) -> tuple[float, float, int]:
  """Median seconds of `step` and of `baseline`, timed alternately, and the run count."""
  step_times, base_times = [], []
  while len(step_times) < args.repeats and (not step_times
                                            or sum(step_times) < args.max_seconds):
    base_times.append(_timed(baseline, baseline_args))
    step_times.append(_timed(step, step_args))
  return statistics.median(step_times), statistics.median(base_times), len(step_times)


def _layer(path: str, config: MoEConfig, capacity_group_size: int) -> Callable:
  """`(x, router, experts) -> (out, dropped fraction)` for one dispatch path."""

  def apply(x, router, experts):
    logits = x.astype(jnp.float32) @ router.astype(jnp.float32)
    if path == "expert_choice":  # its own routing, at the same compute: C = T·k/E
      ec = dataclasses.replace(config, routing="expert_choice", capacity_factor=1.0)
      return (dispatch.expert_choice(x, routing.expert_choice(logits, ec), experts),
              jnp.zeros((), jnp.float32))
    choice = routing.route(logits, config)
    if path == "capacity":
      return dispatch.capacity_dispatch(x, choice, experts, config.capacity_factor,
                                        capacity_group_size)
    return getattr(dispatch, path)(x, choice, experts), jnp.zeros((), jnp.float32)

  return apply


def run_config(name: str, sizes: dict, args: argparse.Namespace) -> None:
  """Times the baseline and every path for one configuration and prints the table."""
  tokens, d, f = args.tokens, args.d_model, sizes["d_ff"]
  n_experts, k = sizes["n_experts"], sizes["top_k"]
  dtype = jnp.dtype(args.dtype)
  config = MoEConfig(n_experts=n_experts, top_k=k, d_ff=f, routing="topk",
                     capacity_factor=args.capacity_factor,
                     capacity_group_size=args.capacity_group_size)
  default = moe.dispatch_path(ModelConfig(vocab_size=1, d_model=d, n_layers=1, n_heads=1,
                                          n_kv_heads=1, d_ff=f, moe=config))
  keys = jax.random.split(jax.random.key(args.seed), 9)
  x = _normal(keys[0], (tokens, d), dtype, 1)
  cotangent = jax.random.normal(keys[1], (tokens, d), jnp.float32)
  router = _normal(keys[2], (d, n_experts), dtype, d)
  experts = dispatch.Experts(_normal(keys[3], (n_experts, d, f), dtype, d),
                             _normal(keys[4], (n_experts, d, f), dtype, d),
                             _normal(keys[5], (n_experts, f, d), dtype, f))
  dense_ffn = (_normal(keys[6], (d, k * f), dtype, d), _normal(keys[7], (d, k * f), dtype, d),
               _normal(keys[8], (k * f, d), dtype, k * f))

  def baseline_loss(x, w_gate, w_up, w_down):
    out = dispatch.swiglu(x, w_gate, w_up, w_down)
    return jnp.sum(out.astype(jnp.float32) * cotangent)

  baseline = jax.jit(jax.value_and_grad(baseline_loss, argnums=(0, 1, 2, 3)))
  baseline_args = (x, *dense_ffn)
  jax.block_until_ready(baseline(*baseline_args))
  flops = 6 * tokens * d * 3 * k * f

  print(f"\n{name}: tokens={tokens} d_model={d} d_ff={f} experts={n_experts} k={k} "
        f"{dtype.name}, backend {jax.default_backend()}, active fwd+bwd {flops / 1e9:.0f} GFLOP")
  print(f"{'path':<12}{'time (s)':>10}{'baseline (s)':>14}{'ratio':>8}{'TFLOP/s':>9}  notes")
  paths = [default, *(p for p in args.paths.split(",") if p != default)]
  for path in paths:
    layer = _layer(path, config, args.capacity_group_size)

    def loss(x, router, experts, layer=layer):
      return jnp.sum(layer(x, router, experts)[0].astype(jnp.float32) * cotangent)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    label = f"{path} *" if path == default else path
    masked_gb = _cpu_ragged_dot_gigabytes(tokens * k, n_experts, d, f, dtype)
    if path == "dropless" and masked_gb > args.max_cpu_ragged_gb:
      print(f"{label:<12}{'-':>10}{'-':>14}{'-':>8}{'-':>9}  skipped: XLA:CPU's ragged_dot "
            f"would materialise ~{masked_gb:.0f} GB of per-expert masks")
      continue
    try:
      jax.block_until_ready(step(x, router, experts))
    except jax.errors.JaxRuntimeError as error:
      print(f"{label:<12}{'-':>10}{'-':>14}{'-':>8}{'-':>9}  failed: "
            f"{str(error).splitlines()[0][:100]}")
      continue
    seconds, base, runs = _interleaved(step, (x, router, experts), baseline, baseline_args,
                                       args)
    notes = [f"{runs} runs"]
    if path == default:
      notes.append('default ("auto")')
    if path == "expert_choice":
      notes.append("expert-choice routing (not top-k), C = T·k/E per group of "
                   f"{args.capacity_group_size}")
    if path == "capacity":
      dropped = jax.jit(layer)(x, router, experts)[1]
      notes.append(f"factor {args.capacity_factor}, groups of {args.capacity_group_size}, "
                   f"dropped {100 * float(dropped):.2f}%")
    print(f"{label:<12}{seconds:>10.3f}{base:>14.3f}{seconds / base:>8.2f}"
          f"{flops / seconds / 1e12:>9.3f}  {', '.join(notes)}")

  # What the experts' SwiGLUs alone cost at their shapes: E batched SwiGLUs of exactly
  # T·k/E rows each (perfect balance, no routing, no gather or scatter).
  rows = tokens * k // n_experts
  grouped_x = _normal(keys[0], (n_experts, rows, d), dtype, 1)

  def grouped_loss(xs, gate, up, down):
    h = jax.nn.silu(jnp.einsum("erd,edf->erf", xs, gate)) * jnp.einsum("erd,edf->erf", xs, up)
    return jnp.sum(jnp.einsum("erf,efd->erd", h, down).astype(jnp.float32))

  # The same experts one after another (a scan, as the blocked path runs them), gate
  # and up fused into one matmul: the blocked path without routing, gather or scatter.
  def scanned_loss(xs, gate, up, down):
    def expert(total, inputs):
      rows, gate, up, down = inputs
      gate_up = rows @ jnp.concatenate([gate, up], axis=-1)
      h = jax.nn.silu(gate_up[:, :f]) * gate_up[:, f:]
      return total + jnp.sum((h @ down).astype(jnp.float32)), None
    return jax.lax.scan(expert, jnp.zeros((), jnp.float32), (xs, gate, up, down))[0]

  references = {
      "(balanced)": (grouped_loss, f"{n_experts} batched expert SwiGLUs of {rows} rows each"),
      "(scanned)": (scanned_loss, "the same, one expert after another (lax.scan), gate|up fused"),
  }
  for label, (reference_loss, what) in references.items():
    reference = jax.jit(jax.value_and_grad(reference_loss, argnums=(0, 1, 2, 3)))
    reference_args = (grouped_x, *experts)
    jax.block_until_ready(reference(*reference_args))
    seconds, base, runs = _interleaved(reference, reference_args, baseline, baseline_args, args)
    print(f"{label:<12}{seconds:>10.3f}{base:>14.3f}{seconds / base:>8.2f}"
          f"{flops / seconds / 1e12:>9.3f}  {runs} runs, reference: {what}, no routing")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="both", choices=[*CONFIGS, "both"])
  parser.add_argument("--tokens", type=int, default=8192)
  parser.add_argument("--d-model", type=int, default=512)
  parser.add_argument("--d-ff", type=int, help="expert width (default: per config)")
  parser.add_argument("--experts", type=int, help="E (default: per config)")
  parser.add_argument("--top-k", type=int, help="k (default: per config)")
  parser.add_argument("--capacity-factor", type=float, default=1.25)
  parser.add_argument("--capacity-group-size", type=int, default=1024)
  parser.add_argument("--paths", default="blocked,dropless,capacity,dense,expert_choice",
                      help=f"comma-separated, from {', '.join(PATHS)}; the default path "
                      "is always timed")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--repeats", type=int, default=5, help="timed calls per path")
  parser.add_argument("--max-seconds", type=float, default=20.0,
                      help="stop repeating a path after this much of its own time")
  parser.add_argument("--max-cpu-ragged-gb", type=float, default=4.0,
                      help="skip dropless on CPU when its masked ragged_dot needs more memory")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--reuse-host-memory", action=argparse.BooleanOptionalAction, default=True,
                      help="glibc keeps freed blocks for reuse, as jbtx.train does "
                           "(jbtx.runtime.host_memory)")
  args = parser.parse_args()
  if args.reuse_host_memory:  # Before JAX (and PyTorch) start their threads.
    host_memory.reuse_freed_blocks()
  unknown = set(args.paths.split(",")) - set(PATHS)
  if unknown:
    parser.error(f"unknown paths {sorted(unknown)}; choose from {', '.join(PATHS)}")
  names = list(CONFIGS) if args.config == "both" else [args.config]
  start = time.perf_counter()
  for name in names:
    sizes = dict(CONFIGS[name])
    for key, value in (("d_ff", args.d_ff), ("n_experts", args.experts),
                       ("top_k", args.top_k)):
      if value is not None:
        sizes[key] = value
    run_config(name, sizes, args)
  print(f"\ntotal {time.perf_counter() - start:.0f} s; ratio = median(path) / "
        "median(baseline: dense SwiGLU of width k·d_ff), fwd+bwd; * = default path")


if __name__ == "__main__":
  main()

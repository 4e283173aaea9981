r"""Peak memory of the BTX mix relative to one of the dense checkpoints it mixes.

    python benchmarks/mix_memory.py [--d_model=2048] [--n_layers=11] [--d_ff=5632]
        [--vocab=32000] [--dtype=bfloat16] [--experts=4]

Writes `--experts` synthetic dense jbtx checkpoints (a TinyLlama-like shape, layers
scanned as the training stages save them, random values; by default 1.39 GB of bf16
parameters, 1.09 GB on disk after Orbax's zstd) one leaf at a time, then mixes them into
an MoE checkpoint in a fresh process exactly as the mix stage (`jbtx.pipeline.stages.mix`) does
(`CheckpointSource`s -> `mix.mixed_parts` -> `checkpoint.save_parts`, random routers,
"experts" FFNs, uniform weights). Prints that process's peak resident memory divided by
the size on disk of one expert checkpoint (and by its parameter bytes), and the same
process's resident memory before mixing (interpreter, JAX with its CPU backend started,
Orbax, TensorStore). Target: ratio <= 1.5 (the mix holds a layer at a time, never N
models; its peak is one MoE layer plus the decode of one stacked `[layers, …]` leaf,
which Orbax stores as one chunk, to read one layer of it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from typing import Any

from jbtx.runtime import host_memory


def _du(directory: pathlib.Path) -> int:
  return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


def dense_config(args: argparse.Namespace) -> Any:
  """The dense model of the flags, layers scanned (one `[layers, …]` leaf per tensor)."""
  from jbtx.config import ModelConfig

  heads = args.n_heads or max(1, args.d_model // 128)
  return ModelConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.n_layers,
                     n_heads=heads, n_kv_heads=heads, d_ff=args.d_ff, dtype=args.dtype,
                     param_dtype=args.dtype, scan_layers=True)


def _leaves(config: Any, seed: int) -> Any:
  """One `{path: array}` part per parameter: norms ones, kernels normal(0, init_std)."""
  import jax
  import numpy as np
  from flax import linen as nn

  from jbtx.models.llama import Llama, abstract_params

  shapes = nn.meta.unbox(abstract_params(Llama(config)))
  flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
  for index, (keys, leaf) in enumerate(flat):
    path = [k.key for k in keys]
    if path[-1] == "scale":
      value = np.ones(leaf.shape, leaf.dtype)
    else:
      rng = np.random.default_rng([seed, index])
      value = rng.standard_normal(leaf.shape, np.float32)
      value *= np.float32(config.init_std)
      value = value.astype(leaf.dtype, copy=False)
    part: dict[str, Any] = {}
    node = part
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
    yield part
    del part, node, value


def write_experts(root: pathlib.Path, config: Any, n: int) -> list[pathlib.Path]:
  """Writes `n` dense checkpoints (seed + n - 1 experts) leaf by leaf; returns their dirs."""
  from jbtx.interop import checkpoint

  dirs = [root / f"expert{i}" for i in range(n)]
  for i, directory in enumerate(dirs):
    checkpoint.save_parts(directory, config, _leaves(config, seed=i))
  return dirs


def measure(out: str, sources: list[str]) -> None:
  """Runs in the child process: mixes as `run_mix` does and prints its memory as JSON."""
  import jax

  from jbtx.config import MoEConfig
  from jbtx.interop import checkpoint
  from jbtx.interop.tensor_source import CheckpointSource
  from jbtx.methods import mix

  jax.devices()  # Orbax starts the backend anyway: count it in the baseline.
  baseline = host_memory.peak_rss()
  start = time.perf_counter()
  srcs = [CheckpointSource(s) for s in sources]
  names = [pathlib.Path(s).name for s in sources]
  mix.check_compatible(srcs, names)
  dense = srcs[0].config
  moe_config = dataclasses.replace(
      dense, moe=MoEConfig(n_experts=len(srcs), top_k=2, d_ff=dense.d_ff))
  unrolled = dataclasses.replace(moe_config, scan_layers=False)
  weights = [1.0] * len(srcs)
  parts = mix.mixed_parts(srcs, unrolled, "experts", 1, weights,
                          mix.random_routers(moe_config, 0))
  checkpoint.save_parts(out, unrolled, parts, extra={"stage": "mix", "experts": names,
                                                     "weights": weights})
  seconds = time.perf_counter() - start
  print(json.dumps({"baseline_bytes": baseline, "peak_bytes": host_memory.peak_rss(),
                    "seconds": seconds}))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--d_model", "--d-model", type=int, default=2048)
  parser.add_argument("--n_layers", "--n-layers", type=int, default=11)
  parser.add_argument("--d_ff", "--d-ff", type=int, default=5632)
  parser.add_argument("--vocab", type=int, default=32000)
  parser.add_argument("--n_heads", "--n-heads", type=int, default=0,
                      help="query and key/value heads (default: d_model // 128, at least 1)")
  parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  parser.add_argument("--experts", type=int, default=4, help="models mixed (seed included)")
  parser.add_argument("--measure", nargs="+", metavar="DIR", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.measure:
    measure(args.measure[0], args.measure[1:])
    return
  if args.experts < 2:
    parser.error(f"--experts={args.experts}: a mix needs at least 2 models")

  import numpy as np

  config = dense_config(args)
  with tempfile.TemporaryDirectory(prefix="mix_memory-") as tmp:
    root = pathlib.Path(tmp)
    print(f"writing {args.experts} dense {args.dtype} checkpoints (d_model {args.d_model}, "
          f"{args.n_layers} layers, d_ff {args.d_ff}, vocab {args.vocab}) ...", flush=True)
    start = time.perf_counter()
    dirs = write_experts(root, config, args.experts)
    write_seconds = time.perf_counter() - start
    size = _du(dirs[0])
    from jbtx.interop import checkpoint

    metadata = checkpoint.params_metadata(dirs[0])
    param_bytes = sum(int(np.prod(m.shape)) * np.dtype(m.dtype).itemsize
                      for m in _metadata_leaves(metadata))
    print(f"mixing {args.experts} x {size / 1e9:.2f} GB in a fresh process ...", flush=True)
    output = root / "mix"
    result = subprocess.run([sys.executable, __file__, "--measure", str(output),
                             *map(str, dirs)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
      sys.exit(f"mix failed:\n{result.stderr}")
    memory = json.loads(result.stdout.strip().splitlines()[-1])
    mixed_size = _du(output)
  peak, baseline = memory["peak_bytes"], memory["baseline_bytes"]
  print(f"one expert checkpoint   {size / 2**30:6.2f} GiB on disk, "
        f"{param_bytes / 2**30:.2f} GiB of parameters")
  print(f"mixed MoE checkpoint    {mixed_size / 2**30:6.2f} GiB ({args.experts} experts)")
  print(f"written in {write_seconds:.0f} s, mixed in {memory['seconds']:.0f} s")
  print(f"process before mixing   {baseline / 2**30:6.2f} GiB (Python + JAX + Orbax + TensorStore)")
  print(f"peak resident memory    {peak / 2**30:6.2f} GiB")
  print(f"peak / parameter bytes  {peak / param_bytes:6.2f}")
  print(f"(peak - before) / size  {(peak - baseline) / size:6.2f}")
  print(f"mix peak RSS / one expert checkpoint = {peak / size:.2f} (target <= 1.5)")


def _metadata_leaves(tree: Any) -> list[Any]:
  if isinstance(tree, Mapping):
    return [leaf for value in tree.values() for leaf in _metadata_leaves(value)]
  return [tree]


if __name__ == "__main__":
  main()

r"""Peak memory of `jbtx.convert import` relative to the checkpoint it converts.

    python benchmarks/convert_memory.py [--gigabytes=1.1] [--dtype=bfloat16]

Writes a synthetic Llama checkpoint in Meta's layout (2 model-parallel shards, bf16,
random values) of about `--gigabytes`, converts it in a fresh process, and prints that
process's peak resident memory divided by the checkpoint's size on disk. Also prints
the same process's resident memory before converting (interpreter, JAX, Orbax), the
baseline that any Python converter pays. Target: ratio <= 1.5 for a bf16 -> bf16
conversion (one copy of the model plus transient buffers).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import subprocess
import sys
import tempfile

from jbtx.runtime import host_memory


def _shape_for(gigabytes: float) -> dict:
  """A Llama-like shape (d_model 2048, vocab 32000) with enough layers for `gigabytes`."""
  d, ff, vocab, heads = 2048, 5632, 32000, 16
  per_layer = 4 * d * d + 3 * d * ff
  layers = max(1, math.ceil((gigabytes * 1e9 / 2 - 2 * vocab * d) / per_layer))
  return {"dim": d, "n_layers": layers, "n_heads": heads, "n_kv_heads": heads,
          "vocab_size": vocab, "multiple_of": 256, "ffn_dim_multiplier": ff / (8 * d / 3),
          "norm_eps": 1e-5, "rope_theta": 10000.0, "d_ff": ff}


def write_meta_checkpoint(directory: pathlib.Path, gigabytes: float) -> int:
  """Writes params.json and consolidated.0{0,1}.pth; returns the bytes written."""
  import torch

  shape = _shape_for(gigabytes)
  d, ff, vocab, n_layers = shape["dim"], shape.pop("d_ff"), shape["vocab_size"], shape["n_layers"]
  directory.mkdir(parents=True)
  (directory / "params.json").write_text(json.dumps(shape))
  generator = torch.Generator().manual_seed(0)

  def rand(*size):
    return (0.02 * torch.randn(*size, generator=generator)).to(torch.bfloat16)

  for shard in range(2):
    ones = torch.ones(d).bfloat16()
    tensors = {"tok_embeddings.weight": rand(vocab, d // 2), "norm.weight": ones,
               "output.weight": rand(vocab // 2, d)}
    for i in range(n_layers):
      p = f"layers.{i}."
      tensors |= {
          p + "attention.wq.weight": rand(d // 2, d), p + "attention.wk.weight": rand(d // 2, d),
          p + "attention.wv.weight": rand(d // 2, d), p + "attention.wo.weight": rand(d, d // 2),
          p + "feed_forward.w1.weight": rand(ff // 2, d),
          p + "feed_forward.w2.weight": rand(d, ff // 2),
          p + "feed_forward.w3.weight": rand(ff // 2, d),
          p + "attention_norm.weight": ones.clone(), p + "ffn_norm.weight": ones.clone()}
    torch.save(tensors, directory / f"consolidated.{shard:02d}.pth")
    del tensors
  return sum(f.stat().st_size for f in directory.glob("consolidated.*.pth"))


def measure(source: str, output: str, dtype: str) -> None:
  """Runs in the child process: converts and prints its memory as JSON."""
  from jbtx.interop import conversion

  baseline = host_memory.peak_rss()
  conversion.import_checkpoint(source, output, dtype=dtype, show_progress=False)
  peak = host_memory.peak_rss()
  print(json.dumps({"baseline_bytes": baseline, "peak_bytes": peak}))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--gigabytes", type=float, default=1.1)
  parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  parser.add_argument("--measure", nargs=2, metavar=("SOURCE", "OUTPUT"), help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.measure:
    measure(*args.measure, args.dtype)
    return
  with tempfile.TemporaryDirectory() as tmp:
    source, output = pathlib.Path(tmp) / "meta", pathlib.Path(tmp) / "jbtx"
    print(f"writing a {args.gigabytes:.1f} GB Meta-layout checkpoint (2 shards) ...", flush=True)
    size = write_meta_checkpoint(source, args.gigabytes)
    print(f"converting {size / 1e9:.2f} GB to {args.dtype} in a fresh process ...", flush=True)
    result = subprocess.run([sys.executable, __file__, "--dtype", args.dtype, "--measure",
                             str(source), str(output)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
      sys.exit(f"conversion failed:\n{result.stderr}")
    memory = json.loads(result.stdout.strip().splitlines()[-1])
  peak, baseline = memory["peak_bytes"], memory["baseline_bytes"]
  print(f"checkpoint size         {size / 2**30:6.2f} GiB")
  print(f"process before convert  {baseline / 2**30:6.2f} GiB (Python + JAX + Orbax)")
  print(f"peak resident memory    {peak / 2**30:6.2f} GiB")
  print(f"peak / checkpoint size  {peak / size:6.2f}   (target <= 1.5)")
  print(f"(peak - before) / size  {(peak - baseline) / size:6.2f}")


if __name__ == "__main__":
  main()

"""Where a train step's time goes: a jbtx stage's XLA trace, summed by model part.

    python -m jbtx.train --config=configs/btx.py --config.btx.only=finetune \\
        --config.profile_steps=20,25 --config.dump_hlo=True
    python benchmarks/trace_summary.py runs/btx/finetune

Reads the newest trace under `<stage>/tensorboard/plugins/profile/` (written by
`--config.profile_steps`) and the compiled train step `<stage>/hlo/train_step.hlo.txt`
(`--config.dump_hlo=True`). Each HLO op the trace shows executing is joined to its
`op_name` metadata in the HLO: the JAX name stack, i.e. the Flax module path
(`layers/attn/q`, `layers/moe/...` with the MoE layer's `router`, `experts` and
`aux_losses` scopes) under `jvp(...)` for the forward pass and `transpose(jvp(...))`
for the backward pass. Prints each part's share of the device op time, forward /
backward / other (loss, gradient clipping, the optimizer update), and the ops that
took longest. Ops that XLA made up itself (copies, some fusions) carry no metadata and
show as "(no metadata)".
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib
import re

_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+) = .*?op_name="([^"]*)"')
_MODULE = re.compile(r"^HloModule ([\w.\-]+)")
_NAME = re.compile(r"^[A-Za-z_]\w*$")
# Name-stack entries that are control flow or wrappers, not parts of the model.
_NOT_PARTS = frozenset({"while", "body", "cond", "closed_call", "checkpoint", "remat",
                        "rematted_computation", "pjit", "core_call"})
PASSES = ("forward", "backward", "other")


def hlo_op_names(hlo_text: str) -> tuple[str, dict[str, str]]:
  """The module name and `{instruction name: op_name}` of a compiled HLO dump."""
  module = _MODULE.match(hlo_text)
  if module is None:
    raise ValueError("not an HLO module dump: no 'HloModule' first line")
  names = {}
  for line in hlo_text.splitlines():
    match = _INSTRUCTION.match(line)
    if match:
      names[match.group(1)] = match.group(2).split(";")[0]
  return module.group(1), names


def part_of(op_name: str, depth: int) -> tuple[str, str]:
  """(`forward` | `backward` | `other`, model part) of a JAX `op_name`.

  The part is the first `depth` module / scope names of the name stack, e.g.
  "jit(train_step)/transpose(jvp(Llama))/Llama.run_blocks/while/body/closed_call/
  layers/moe/experts/dot_general" -> ("backward", "layers/moe/experts").
  """
  stack = op_name.split("/")[1:-1]  # without jit(train_step) and the primitive
  names = [name for name in stack if _NAME.match(name) and name not in _NOT_PARTS]
  direction = ("backward" if "transpose(" in op_name
               else "forward" if "jvp(" in op_name else "other")
  return direction, "/".join(names[:depth]) or "(outside the model)"


def op_events(trace: dict, module: str) -> list[tuple[str, float]]:
  """(HLO op, microseconds) of every op of `module` the trace shows running."""
  return [(event["args"]["hlo_op"], float(event["dur"]))
          for event in trace["traceEvents"]
          if event.get("ph") == "X" and event.get("args", {}).get("hlo_module") == module
          and "hlo_op" in event["args"]]


def summarize(stage: pathlib.Path, depth: int = 3) -> dict:
  """Op time of `stage`'s newest trace by part and direction, and by op.

  Returns `{"module", "devices", "total_us", "parts": {part: {direction: us}},
  "ops": {hlo op: (us, direction, part)}, "matched": fraction of time with metadata}`.
  """
  traces = sorted((stage / "tensorboard" / "plugins" / "profile").glob("*/*.trace.json.gz"))
  hlo_file = stage / "hlo" / "train_step.hlo.txt"
  if not traces:
    raise FileNotFoundError(f"no trace under {stage}/tensorboard/plugins/profile: train "
                            "the stage with --config.profile_steps=FIRST,LAST")
  if not hlo_file.is_file():
    raise FileNotFoundError(f"no {hlo_file}: train the stage with --config.dump_hlo=True")
  module, op_names = hlo_op_names(hlo_file.read_text())
  with gzip.open(traces[-1], "rt") as f:
    trace = json.load(f)
  events = op_events(trace, module)
  if not events:
    raise ValueError(f"{traces[-1]} has no ops of {module} (a trace of another program?)")
  devices = {event["args"].get("device_ordinal") for event in trace["traceEvents"]
             if event.get("args", {}).get("hlo_module") == module}
  parts: dict[str, dict[str, float]] = collections.defaultdict(
      lambda: dict.fromkeys(PASSES, 0.0))
  ops: dict[str, list] = {}
  matched = 0.0
  for op, micros in events:
    if op in op_names:
      direction, part = part_of(op_names[op], depth)
      matched += micros
    else:
      direction, part = "other", "(no metadata)"
    parts[part][direction] += micros
    ops.setdefault(op, [0.0, direction, part])[0] += micros
  total = sum(micros for _, micros in events)
  return {"module": module, "devices": len(devices), "total_us": total,
          "parts": dict(parts), "ops": {op: tuple(v) for op, v in ops.items()},
          "matched": matched / total, "trace": str(traces[-1])}


def print_summary(summary: dict, top: int) -> None:
  total = summary["total_us"]
  print(f"{summary['trace']}\n{summary['module']}: {total / 1e3:,.1f} ms of op time on "
        f"{summary['devices']} device(s); {summary['matched']:.0%} of it joined to metadata")
  print(f"{'part':<34}" + "".join(f"{name:>10}" for name in (*PASSES, "total")))
  by_total = sorted(summary["parts"].items(), key=lambda item: -sum(item[1].values()))
  for part, times in by_total:
    shares = [times[name] / total for name in PASSES]
    print(f"{part:<34}" + "".join(f"{share:>10.1%}" for share in (*shares, sum(shares))))
  print(f"\nthe {top} longest ops:")
  longest = sorted(summary["ops"].items(), key=lambda item: -item[1][0])[:top]
  for op, (micros, direction, part) in longest:
    print(f"  {op:<40}{micros / total:>7.1%}  {direction:<9}{part}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("stage", type=pathlib.Path, help="a stage directory, e.g. runs/btx/finetune")
  parser.add_argument("--depth", type=int, default=3, help="name-stack entries per part")
  parser.add_argument("--top", type=int, default=12, help="longest ops to list")
  args = parser.parse_args()
  try:
    summary = summarize(args.stage, args.depth)
  except (FileNotFoundError, ValueError) as e:
    parser.exit(2, f"trace_summary.py: {e}\n")
  print_summary(summary, args.top)


if __name__ == "__main__":
  main()

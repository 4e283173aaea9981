"""The results table: rows summarised with their averages and compute, as text and JSON.

    rows = {"seed": summarise(evaluate_model(...), compute), ...}
    print(table(rows)); write_results(rows, path, notes)
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from jbtx.runtime import files


def summarise(row: dict[str, Any], compute: Mapping[str, float]) -> dict[str, Any]:
  """`row` with its averages (over domains and tasks) and its training compute."""
  losses = [v["loss"] for v in row["domains"].values()]
  accuracies = [v["accuracy"] for v in row["tasks"].values()]
  average = {"loss": float(np.mean(losses)), "perplexity": math.exp(float(np.mean(losses)))}
  if accuracies:
    average["accuracy"] = float(np.mean(accuracies))
  return row | {"average": average, "compute": dict(compute)}


def table(rows: Mapping[str, Mapping[str, Any]]) -> str:
  """The results as a fixed-width text table: perplexity per domain, task accuracy ("-"
  where a row has no score for a task), average perplexity and accuracy, training FLOPs."""
  first = next(iter(rows.values()))
  domains, tasks = list(first["domains"]), list(first["tasks"])
  header = (["model"] + [f"ppl {d}" for d in domains] + [f"acc {t}" for t in tasks]
            + ["avg ppl"] + (["avg acc"] if tasks else []) + ["train FLOPs"])
  lines = [header]
  for name, row in rows.items():
    cells = [name] + [f"{row['domains'][d]['perplexity']:.3f}" for d in domains]
    cells += [f"{row['tasks'][t]['accuracy']:.3f}" if t in row["tasks"] else "-"
              for t in tasks]
    cells += [f"{row['average']['perplexity']:.3f}"]
    cells += [f"{row['average']['accuracy']:.3f}"] if tasks else []
    cells += [f"{row['compute']['flops']:.3e}"]
    lines.append(cells)
  widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
  return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w)
                             for i, (c, w) in enumerate(zip(line, widths, strict=True)))
                   for line in lines)


def write_results(rows: Mapping[str, Mapping[str, Any]], path: pathlib.Path,
                  notes: Mapping[str, str]) -> None:
  """`{"rows", "notes"}` as JSON at `path` (process 0, atomically)."""
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_json(path, {"rows": rows, "notes": dict(notes)})

"""The BTX paper's routing plots from `jbtx.eval.routing_analysis` statistics, as PNG files.

    layer_loads(statistics)              per domain, a layers × experts heatmap of load
    domain_experts(statistics)           domains × experts, load averaged over layers
                                         (the paper's Figure 3)
    load_comparison({"with LB": a, "without LB": b})   Figure 3 side by side
    token_experts_figure(tokenizer, {domain: token_experts(...)}, layer=-1)
                                         a text, each token filled with its top-1 expert's
                                         colour over a band of its top-2 expert's
    save_routing_plots(...)              the first three (and the text) into a directory

Load is the top-k load (`topk_load`: each expert's share of the routed assignments).
The figures are `matplotlib.figure.Figure`s, made without pyplot (no global state, any
backend); notebooks display them as they are.
"""

from __future__ import annotations

import io
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from jbtx.data.tokenizers import Tokenizer
from jbtx.runtime import files

Statistics = Mapping[str, Mapping[str, np.ndarray]]  # domain -> name -> array
TokenExperts = tuple[np.ndarray, np.ndarray, np.ndarray]  # ids [n], experts/gates [L, n, k]
_TOKENS_PER_LINE = 40


def expert_labels(n_experts: int, names: Sequence[str] | None = None) -> list[str]:
  """`names` when they name every expert (BTX's mixed experts), else e0, e1, …"""
  if names is not None and len(names) == n_experts:
    return list(names)
  return [f"e{i}" for i in range(n_experts)]


def _load(statistics: Statistics, domain: str) -> np.ndarray:
  return np.asarray(statistics[domain]["topk_load"], np.float32)  # [layers, E]


def layer_loads(statistics: Statistics, title: str = "",
                experts: Sequence[str] | None = None) -> Figure:
  """One heatmap per domain: rows layers, columns experts, colour the top-k load."""
  domains = list(statistics)
  n_layers, n_experts = _load(statistics, domains[0]).shape
  figure = Figure(figsize=(2.2 + 0.45 * n_experts * len(domains), 1.6 + 0.3 * n_layers),
                  layout="constrained")
  axes = figure.subplots(1, len(domains), squeeze=False)[0]
  image = None
  for ax, domain in zip(axes, domains, strict=True):
    image = ax.imshow(_load(statistics, domain), vmin=0, vmax=1, cmap="viridis",
                      aspect="auto")
    ax.set_title(domain)
    ax.set_xticks(range(n_experts), expert_labels(n_experts, experts), rotation=90)
    ax.set_yticks(range(n_layers))
    ax.set_xlabel("expert")
  axes[0].set_ylabel("layer")
  figure.colorbar(image, ax=list(axes), label="share of routed tokens")
  figure.suptitle(f"{title}: expert load by layer".lstrip(": "))
  return figure


def _matrix(ax, statistics: Statistics, experts: Sequence[str] | None) -> object:
  domains = list(statistics)
  matrix = np.stack([_load(statistics, d).mean(axis=0) for d in domains])  # [D, E]
  image = ax.imshow(matrix, vmin=0, vmax=max(float(matrix.max()), 1e-6), cmap="Blues")
  for (i, j), value in np.ndenumerate(matrix):
    ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8,
            color="white" if value > 0.6 * matrix.max() else "black")
  ax.set_xticks(range(matrix.shape[1]), expert_labels(matrix.shape[1], experts), rotation=90)
  ax.set_yticks(range(len(domains)), domains)
  ax.set_xlabel("expert")
  ax.set_ylabel("domain")
  return image


def domain_experts(statistics: Statistics, title: str = "",
                   experts: Sequence[str] | None = None) -> Figure:
  """Domains × experts: each domain's top-k load averaged over layers (Figure 3)."""
  n_experts = _load(statistics, next(iter(statistics))).shape[1]
  figure = Figure(figsize=(2.5 + 0.5 * n_experts, 1.5 + 0.4 * len(statistics)),
                  layout="constrained")
  ax = figure.subplots()
  figure.colorbar(_matrix(ax, statistics, experts), ax=ax, label="share of routed tokens")
  ax.set_title(f"{title}: load per domain, mean over layers".lstrip(": "))
  return figure


def load_comparison(runs: Mapping[str, Statistics],
                    experts: Sequence[str] | None = None) -> Figure:
  """Figure 3 of each run side by side, e.g. `{"with LB": a, "without LB": b}`."""
  first = next(iter(runs.values()))
  n_experts = _load(first, next(iter(first))).shape[1]
  figure = Figure(figsize=(len(runs) * (2.5 + 0.5 * n_experts), 1.5 + 0.4 * len(first)),
                  layout="constrained")
  for ax, (label, statistics) in zip(figure.subplots(1, len(runs), squeeze=False)[0],
                                     runs.items(), strict=True):
    _matrix(ax, statistics, experts)
    ax.set_title(label)
  return figure


def _token_text(tokenizer: Tokenizer, token: int) -> str:
  text = tokenizer.decode(np.asarray([token]))
  return text.replace("\n", "⏎").replace(" ", "␣") or "·"


def token_experts_figure(tokenizer: Tokenizer, texts: Mapping[str, TokenExperts],
                         layer: int = -1, experts: Sequence[str] | None = None) -> Figure:
  """Each text's tokens, filled with the colour of their top-1 expert in `layer` over a
  lower band in the colour of their top-2 (the legend names the experts)."""
  n_experts = int(max(int(e.max()) for _, e, _ in texts.values())) + 1
  labels = expert_labels(n_experts, experts)
  colours = [f"C{i % 10}" for i in range(n_experts)]
  width = _TOKENS_PER_LINE
  lines = [(domain, ids[start:start + width], chosen[layer][start:start + width])
           for domain, (ids, chosen, _) in texts.items() for start in range(0, len(ids), width)]
  figure = Figure(figsize=(0.3 * _TOKENS_PER_LINE + 1.5, 0.35 * len(lines) + 1.0),
                  layout="constrained")
  ax = figure.subplots()
  for row, (domain, ids, chosen) in enumerate(lines):
    y = len(lines) - row
    ax.text(-0.5, y + 0.4, domain if row == 0 or lines[row - 1][0] != domain else "",
            ha="right", va="center", fontsize=8)
    for x, (token, top) in enumerate(zip(ids, chosen, strict=True)):
      ax.add_patch(Rectangle((x, y + 0.2), 0.95, 0.7, color=colours[top[0]], alpha=0.55))
      if len(top) > 1:
        ax.add_patch(Rectangle((x, y), 0.95, 0.2, color=colours[top[1]]))
      ax.text(x + 0.47, y + 0.55, _token_text(tokenizer, int(token)), ha="center",
              va="center", fontsize=7, family="monospace")
  ax.set_xlim(-4, _TOKENS_PER_LINE)
  ax.set_ylim(0.8, len(lines) + 1.1)
  ax.axis("off")
  ax.legend(handles=[Rectangle((0, 0), 1, 1, color=c, alpha=0.7) for c in colours],
            labels=labels, loc="upper center", ncol=min(n_experts, 8), fontsize=7,
            bbox_to_anchor=(0.5, 0.0), frameon=False)
  name = "last layer" if layer == -1 else f"layer {layer}"
  ax.set_title(f"top-1 expert (fill) and top-2 (band) of each token, {name}", fontsize=9)
  return figure


def png_bytes(figure: Figure) -> bytes:
  """`figure` as PNG bytes, e.g. for `IPython.display.Image`."""
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png", dpi=110)
  return buffer.getvalue()


def save_png(figure: Figure, path: str | pathlib.Path) -> pathlib.Path:
  """Writes `figure` as a PNG at `path` (atomically) and returns the path."""
  data = png_bytes(figure)
  files.write_atomically(path, lambda f: f.write(data))
  return pathlib.Path(path)


def save_routing_plots(statistics: Statistics, texts: Mapping[str, TokenExperts],
                       tokenizer: Tokenizer, directory: str | pathlib.Path, title: str,
                       experts: Sequence[str] | None = None) -> list[pathlib.Path]:
  """`layer_loads.png`, `domain_experts.png` and `tokens.png` in `directory`."""
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  return [save_png(layer_loads(statistics, title, experts), directory / "layer_loads.png"),
          save_png(domain_experts(statistics, title, experts),
                   directory / "domain_experts.png"),
          save_png(token_experts_figure(tokenizer, texts, experts=experts),
                   directory / "tokens.png")]

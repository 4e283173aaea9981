"""Validation loss against training FLOPs, one line per method: the BTX paper's Figure 2
in kind, from the results rows' curves (`jbtx.pipeline.curves`).

    figure = curves_figure(curves, methods=["btm top-1", "upcycle", "dense", "btx"],
                           reference="seed")

The first panel is the average loss over the domains, then one panel per domain
(there the experts' own curves appear too, thin and dotted). The x axis is
logarithmic, so the points at zero FLOPs (a method's starting model) are left out;
the reference row (the seed every method starts from) is a dashed horizontal line. A
method of one point (BTM's ensembles, which train nothing of their own) is a marker.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from jbtx.eval.plots import save_png

Curve = Sequence[Mapping[str, Any]]  # points {"flops", "loss", "domains"}


def _draw(ax: Any, curve: Curve, value: Any, label: str, style: Mapping[str, Any]) -> None:
  points = [(p["flops"], value(p)) for p in curve if p["flops"] > 0 and value(p) is not None]
  if not points:
    return
  x, y = zip(*points, strict=True)
  if len(points) == 1:
    ax.plot(x, y, marker="o", linestyle="none", label=label)
  else:
    ax.plot(x, y, marker=".", label=label, **style)


def curves_figure(curves: Mapping[str, Curve], methods: Sequence[str],
                  reference: str | None = None) -> Figure:
  """Average and per-domain validation loss against training FLOPs (log x).

  Args:
    curves: row name -> its points; rows not in `methods` (the experts) appear only in
      the panels of the domains their curves cover.
    methods: the rows drawn in every panel, in legend order.
    reference: a row drawn as a horizontal line at its last loss (None: none).
  """
  domains = sorted({d for curve in curves.values() for p in curve for d in p["domains"]})
  figure = Figure(figsize=(4.2 * (1 + len(domains)), 3.6), layout="constrained")
  axes = figure.subplots(1, 1 + len(domains), squeeze=False)[0]
  panels = [("average", lambda p: p["loss"])] + [
      (d, lambda p, d=d: p["domains"].get(d)) for d in domains]
  for ax, (title, value) in zip(axes, panels, strict=True):
    for name in methods:
      _draw(ax, curves[name], value, name, {})
    if title != "average":
      for name, curve in curves.items():
        if name not in methods and name != reference and curve and title in curve[-1]["domains"]:
          _draw(ax, curve, value, f"expert {name}", {"linestyle": ":", "linewidth": 1})
    if reference and curves.get(reference):
      ax.axhline(value(curves[reference][-1]), color="grey", linestyle="--", label=reference)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())  # labels of decades only
    ax.set_title(title)
    ax.set_xlabel("training FLOPs")
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("validation loss (nats/token)")
  axes[0].legend(fontsize="small")
  if len(axes) > 1:
    axes[-1].legend(fontsize="x-small")
  return figure


def save_curves(curves: Mapping[str, Curve], methods: Sequence[str], reference: str | None,
                path: pathlib.Path) -> pathlib.Path:
  """`curves_figure(...)` as a PNG at `path`, written atomically."""
  path.parent.mkdir(parents=True, exist_ok=True)
  return save_png(curves_figure(curves, methods, reference), path)

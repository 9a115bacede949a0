"""Figures of Lipschitz-bound training (registered in orchestrator.figures.FIGURES): the global
and local Lipschitz bounds during training (Local-Lip Figure 2, per layer appendix Figure 7) and
the share of varying ReLUs per layer (Local-Lip Figure 3, and appendix Figure 6 over the
epochs).

- `lipschitz_during_training`: Figure 2's three panels from each row's per-epoch history:
  (a) the global (`lipschitz`, solid) and the average local (`local_lipschitz`, dashed) bound,
  log scale; (b) the natural cross-entropy (`fit_loss`); (c) the cross-entropy on the worst
  logits (`robust_loss`). `bcp` and `local_lip_*` record both bounds (the one they do not train
  with on one step in ten: workers/core/methods/bcp.py TRACK_EVERY).
- `layer_lipschitz_during_training`: appendix Figure 7, a panel per row: each layer's norm over
  the epochs in the global bound (`lipschitz.layer{i}`, solid) and, averaged over the examples, in
  the local one (`local_lipschitz.layer{i}`, dashed), the logit layer last.
- `varying_relu_share`: Figure 3's grouped bars, the varying share of each hidden layer per row
  (the `varying_relu` diagnostic, measured on the trained network with the Local-Lip
  certificate's bounds), then for each row whose history holds the per-layer shares
  (`varying_fraction.layer{i}`, recorded by `bcp` and `local_lip_*` training) a panel of those
  over the epochs (Figure 6).

Each returns None when no row has its data.
"""
from __future__ import annotations

import math
import re
from typing import Any

import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .figures import FIGURES, legend_below, row_history, row_metrics, row_title

# the two bounds: history key, line style, name in the legend
BOUNDS = (("lipschitz", "-", "global"), ("local_lipschitz", "--", "local"))
# Figure 2's panels: (history keys drawn, with their line styles), title, y label, log scale
TRAINING_PANELS = [
    (BOUNDS, "(a) global and average local Lipschitz bound", "Lipschitz bound", True),
    ((("fit_loss", "-", None),), "(b) cross-entropy, natural", "cross-entropy", False),
    ((("robust_loss", "-", None),), "(c) cross-entropy, worst logits", "cross-entropy", False),
]


def _series(history: list[dict[str, Any]], key: str) -> list[float]:
    """One value per epoch, NaN where the epoch lacks it (a gap in the line)."""
    values = [h.get(key) for h in history]
    return [float(v) if isinstance(v, (int, float)) and math.isfinite(v) else math.nan
            for v in values]


def _has(history: list[dict[str, Any]], key: str) -> bool:
    return any(not math.isnan(v) for v in _series(history, key))


@FIGURES.register("lipschitz_during_training")
def lipschitz_during_training(job: Any, table: dict[str, Any]) -> Figure | None:
    rows = [row for row in job.rows
            if _has(row_history(row), "lipschitz") or _has(row_history(row), "local_lipschitz")]
    if not rows:
        return None
    figure, axes = plt.subplots(1, len(TRAINING_PANELS), figsize=(5 * len(TRAINING_PANELS), 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for axis, (curves, title, ylabel, log) in zip(axes, TRAINING_PANELS):
        for number, row in enumerate(rows):
            history = row_history(row)
            epochs = list(range(1, len(history) + 1))
            for key, style, which in curves:
                if _has(history, key):
                    label = row_title(row, table) + (f", {which}" if which else "")
                    axis.plot(epochs, _series(history, key), linestyle=style, label=label,
                              color=colours[number % len(colours)])
        axis.set(title=title, xlabel="epoch", ylabel=ylabel)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs, not fractions
        if log and axis.lines:
            axis.set_yscale("log")
    legend_below(figure, axes[:1])  # panel (a) names every row and both bounds
    return figure


def _per_layer(history: list[dict[str, Any]], name: str) -> dict[int, list[float]]:
    """Per layer (1-based) the history's `name.layer{i}` over the epochs, where it has them."""
    pattern = re.compile(rf"^{re.escape(name)}\.layer(\d+)$")
    layers = sorted({int(m.group(1)) for h in history for key in h if (m := pattern.match(key))})
    return {layer: _series(history, f"{name}.layer{layer}") for layer in layers}


def _measured_shares(row: Any) -> list[float]:
    """The `varying_relu` diagnostic's share per hidden layer, in layer order."""
    measured = row_metrics(row, "varying_relu")
    layers = sorted(int(key[5:]) for key in measured if re.fullmatch(r"layer\d+", key))
    return [float(measured[f"layer{layer}"]) for layer in layers]


@FIGURES.register("varying_relu_share")
def varying_relu_share(job: Any, table: dict[str, Any]) -> Figure | None:
    measured = [(row, shares) for row in job.rows if (shares := _measured_shares(row))]
    tracked = [(row, shares) for row in job.rows
               if (shares := _per_layer(row_history(row), "varying_fraction"))]
    if not measured and not tracked:
        return None
    panels = (1 if measured else 0) + len(tracked)
    figure, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.2), squeeze=False)
    axes = list(axes[0])
    if measured:
        axis = axes.pop(0)
        width = 0.8 / len(measured)
        for number, (row, shares) in enumerate(measured):
            positions = [layer + (number - (len(measured) - 1) / 2) * width
                         for layer in range(1, len(shares) + 1)]
            axis.bar(positions, shares, width=width, label=row_title(row, table))
        layers = max(len(shares) for _, shares in measured)
        axis.set_xticks(range(1, layers + 1), [f"layer {i}" for i in range(1, layers + 1)],
                        fontsize="small")
        axis.set(title="varying ReLU outputs, trained network", ylabel="share of outputs",
                 ylim=(0, 1.02))
        axis.legend(fontsize="small")
    for axis, (row, shares) in zip(axes, tracked):
        for layer, values in shares.items():
            axis.plot(range(1, len(values) + 1), values, label=f"layer {layer}")
        axis.set(title=f"during training: {row_title(row, table)}", xlabel="epoch",
                 ylabel="share of outputs", ylim=(0, 1.02))
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.legend(fontsize="x-small")
    figure.tight_layout()
    return figure


@FIGURES.register("layer_lipschitz_during_training")
def layer_lipschitz_during_training(job: Any, table: dict[str, Any]) -> Figure | None:
    """Appendix Figure 7: a panel per row, each layer's norm over the epochs, in the global bound
    (solid) and on average in the local one (dashed), log scale."""
    rows = [(row, {name: layers for name in ("lipschitz", "local_lipschitz")
                   if (layers := _per_layer(row_history(row), name))}) for row in job.rows]
    rows = [(row, curves) for row, curves in rows if curves]
    if not rows:
        return None
    figure, axes = plt.subplots(1, len(rows), figsize=(5.5 * len(rows), 4.2), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for axis, (row, curves) in zip(axes[0], rows):
        for name, style, which in BOUNDS:
            for layer, values in curves.get(name, {}).items():
                axis.plot(range(1, len(values) + 1), values, linestyle=style,
                          color=colours[(layer - 1) % len(colours)],
                          label=f"layer {layer}, {which}")
        axis.set(title=row_title(row, table), xlabel="epoch", ylabel="layer norm")
        axis.set_yscale("log")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.legend(fontsize="x-small", ncol=2)
    figure.tight_layout()
    return figure

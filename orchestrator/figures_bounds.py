"""Figures of the bounds themselves (registered in orchestrator.figures.FIGURES): the toy
polytope against its interval box (IBP Figure 4) and the per-example tightness of BCP's outer
bound against the global Lipschitz bound (BCP Figure 3).

Both read the `figure_data` block a row's result carries (written by the diagnostics of
workers/core/diagnostics.py), so they draw only rows that recorded it and return None when no
row did:

- `polytope_and_box`: a panel per row: the sampled adversarial polytope in logit space (its
  convex hull filled gray, the image of the input box's boundary as a thin line), the IBP box
  (green), the nominal logits and the decision boundary logit_0 = logit_1.
- `tightness_violin`: a panel per row: the violin of tau(x) with BCP over the test examples, the
  global Lipschitz bound's constant tau as a dotted line, and the mean tightening in %.
"""
from __future__ import annotations

from typing import Any, Callable

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Polygon, Rectangle

from .figures import FIGURES, legend_below, row_metrics, row_title

GRAY, GREEN = "#9a9a9a", "#2ca02c"


def _figure_data(row: Any, name: str) -> dict[str, Any] | None:
    return ((row.result or {}).get("figure_data") or {}).get(name) or None


PanelFn = Callable[[Axes, Any, dict[str, Any], dict[str, Any]], None]


def panel_per_row(name: str, diagnostic: str, needed: str, width: float,
                  height: float) -> Callable[[PanelFn], Callable[..., Figure | None]]:
    """Registers figure `name`: a panel per row whose figure_data[diagnostic] holds `needed`,
    each drawn by the decorated `draw(axis, row, data, table)`, with one legend under them;
    None when no row has the data."""
    def register(draw: PanelFn) -> Callable[..., Figure | None]:
        def figure_of(job: Any, table: dict[str, Any]) -> Figure | None:
            rows = [(row, data) for row in job.rows
                    if (data := _figure_data(row, diagnostic)) and data.get(needed)]
            if not rows:
                return None
            figure, axes = plt.subplots(1, len(rows), figsize=(width * len(rows), height),
                                        squeeze=False)
            for axis, (row, data) in zip(axes[0], rows):
                draw(axis, row, data, table)
            legend_below(figure, axes[0])
            return figure
        figure_of.__doc__ = draw.__doc__
        return FIGURES.add(name, figure_of)
    return register


@panel_per_row("polytope_and_box", "bound_area", "hull", 4.2, 4.2)
def polytope_and_box(axis: Axes, row: Any, data: dict[str, Any], table: dict[str, Any]) -> None:
    """IBP Figure 4: the adversarial polytope (gray) and its IBP box (green) of one row."""
    (x_low, x_high), (y_low, y_high) = data["box"]
    axis.add_patch(Polygon(data["hull"], closed=True, facecolor=GRAY, edgecolor=GRAY,
                           label="adversarial polytope (sampled, hull)"))
    if data.get("outline"):
        outline = list(zip(*data["outline"]))
        axis.plot(*outline, color="#555555", linewidth=0.6, label="image of the box's edge")
    axis.add_patch(Rectangle((x_low, y_low), x_high - x_low, y_high - y_low, fill=False,
                             edgecolor=GREEN, linewidth=1.8, label="IBP bounds"))
    axis.plot(*data["point"], marker="o", color="black", markersize=4,
              label="nominal logits", linestyle="none")
    pad = 0.1 * max(x_high - x_low, y_high - y_low, 1e-6)
    x_limits, y_limits = (x_low - pad, x_high + pad), (y_low - pad, y_high + pad)
    shared = (max(x_limits[0], y_limits[0]), min(x_limits[1], y_limits[1]))
    if shared[0] < shared[1]:
        # logit 0 = logit 1, where the class changes, drawn where it crosses the view.
        axis.plot(shared, shared, color="#c44e52", linestyle="--", linewidth=0.8,
                  label="logit 0 = logit 1")
    axis.set(xlim=x_limits, ylim=y_limits, xlabel="logit 0", ylabel="logit 1",
             title=row_title(row, table))
    note = f"test example {data['example']} (label {data['label']})"
    fill = row_metrics(row, "bound_area").get("fill")
    if fill is not None:
        note += f"\nthe hull fills {100 * fill:.3g}% of the box"
    axis.annotate(note, xy=(0.98, 0.02), xycoords="axes fraction", ha="right", va="bottom",
                  fontsize="x-small")


@panel_per_row("tightness_violin", "tightness", "bcp", 3.2, 4.5)
def tightness_violin(axis: Axes, row: Any, data: dict[str, Any], table: dict[str, Any]) -> None:
    """BCP Figure 3: tau(x) with BCP per example of one row (violin), the global bound's tau
    (dotted)."""
    taus = data["bcp"]
    tightness = row_metrics(row, "tightness")
    if len(set(taus)) > 1:
        axis.violinplot([taus], positions=[0], showmeans=True, showextrema=True)
    else:  # one value (or all equal): a violin has no width; mark the value itself
        axis.plot([0], taus[:1], marker="_", markersize=30, color="#1f77b4")
    if tightness.get("global") is not None:
        axis.hlines(tightness["global"], -0.45, 0.45, colors="black", linestyles=":",
                    label="global Lipschitz bound")
    if tightness.get("reduction") is not None:
        axis.annotate(f"BCP tightens by {100 * tightness['reduction']:.1f}% on average",
                      xy=(0.5, 0.98), xycoords="axes fraction", ha="center", va="top",
                      fontsize="small")
    axis.set_xticks([0], [f"{len(taus)} examples"])
    axis.set(xlim=(-0.6, 0.6), ylabel="tau(x) (smaller is tighter)",
             title=row_title(row, table))
    axis.set_ylim(0, 1.12 * max(max(taus), tightness.get("global") or 0) or 1.0)

"""Figures of a job, drawn with matplotlib from what the job store holds (no MLflow round trip),
as PNG bytes: served at `GET /jobs/{id}/figures/{name}`, shown on the report page, and logged to
the job's MLflow run when it finishes.

Each figure is a function of the job and its assembled table registered in FIGURES; it returns
None when the job has nothing to draw yet (no finished epoch, no reported number), so the report
page lists only the figures that exist. Registered here:

- `training_curves`: per row (and seed), the per-epoch means the trainer records: the loss, and
  the training batches' verified fraction where the method computes one; eps_train on a twin axis.
- `seconds_per_epoch`: per row, the median seconds per epoch (the timing tables' quantity).
- `reproduced_vs_reported`: every cell with both numbers, ours against the paper's, with the
  diagonal and the tolerance band; the quick profile is marked as not comparable.
- `curves_over_eps`: for the figure specs whose rows certify one trained model at several eps
  (IBP Figure 3, BCP Figure 4), every column over eps, a line per row group.
"""
from __future__ import annotations

import io
import statistics
from typing import Any, Callable

import matplotlib

matplotlib.use("Agg")  # no display: render to memory only
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from workers.core.registry import Registry  # noqa: E402

FigureFn = Callable[[Any, dict[str, Any]], "Figure | None"]
FIGURES: Registry[FigureFn] = Registry("figure")


def _row_label(row: Any) -> str:
    return f"{row.name} (seed {row.seed})"


def row_history(row: Any) -> list[dict[str, Any]]:
    """The per-epoch means of a finished row's result (none while it runs)."""
    return (row.result or {}).get("history") or []


def row_metrics(row: Any, name: str) -> dict[str, Any]:
    """The numbers a row's result holds under one diagnostic (e.g. varying_relu)."""
    return ((row.result or {}).get("metrics") or {}).get(name) or {}


def row_title(row: Any, table: dict[str, Any]) -> str:
    """The table's label of the row (e.g. "(b) Training step 200"), and its seed."""
    labels = {r.get("id"): r.get("label") for r in table.get("rows", [])}
    return f"{labels.get(row.name) or row.name} (seed {row.seed})"


def legend_below(figure: Figure, axes) -> None:
    """One legend for all panels, under them (inside a panel it hides what it explains)."""
    entries = {}
    for axis in axes:
        for handle, label in zip(*axis.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    if not entries:
        figure.tight_layout()
        return
    figure.legend(entries.values(), entries.keys(), loc="lower center", fontsize="small",
                  ncol=min(len(entries), 3), frameon=False)
    rows_of_entries = (len(entries) + 2) // 3
    figure.tight_layout(rect=(0, 0.06 * rows_of_entries + 0.02, 1, 1))


@FIGURES.register("training_curves")
def training_curves(job: Any, table: dict[str, Any]) -> Figure | None:
    rows = [row for row in job.rows if row_history(row)]
    if not rows:
        return None
    figure, (loss_axis, verified_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for row in rows:
        history = row_history(row)
        epochs = list(range(1, len(history) + 1))
        loss_axis.plot(epochs, [h.get("loss") for h in history], marker=".",
                       label=_row_label(row))
        if any("train_verified" in h for h in history):
            verified_axis.plot(epochs, [h.get("train_verified") for h in history], marker=".",
                               label=_row_label(row))
    loss_axis.set(title="training loss", xlabel="epoch", ylabel="loss")
    verified_axis.set(title="verified fraction of training batches", xlabel="epoch",
                      ylabel="fraction", ylim=(-0.02, 1.02))
    loss_axis.legend(fontsize="small")
    figure.tight_layout()
    return figure


@FIGURES.register("seconds_per_epoch")
def seconds_per_epoch(job: Any, table: dict[str, Any]) -> Figure | None:
    labels, seconds = [], []
    for row in job.rows:
        timing = (row.result or {}).get("timing") or {}
        per_epoch = timing.get("sec_per_epoch") or []
        if per_epoch:
            labels.append(_row_label(row))
            seconds.append(statistics.median(per_epoch))
    if not labels:
        return None
    figure, axis = plt.subplots(figsize=(max(5, 1.2 * len(labels)), 4))
    axis.bar(range(len(labels)), seconds, color="#4c72b0")
    axis.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize="small")
    axis.set(title="median seconds per epoch", ylabel="seconds")
    figure.tight_layout()
    return figure


@FIGURES.register("reproduced_vs_reported")
def reproduced_vs_reported(job: Any, table: dict[str, Any]) -> Figure | None:
    points = []
    for row in table.get("rows", []):
        for column in table.get("columns", []):
            cell = (row.get("cells") or {}).get(column.get("key")) or {}
            if cell.get("reproduced") is not None and cell.get("reported") is not None:
                points.append((cell["reported"], cell["reproduced"], column, cell.get("verdict")))
    if not points:
        return None
    figure, axis = plt.subplots(figsize=(5.5, 5))
    colours = {"within": "#55a868", "off": "#c44e52"}
    for paper, ours, column, verdict in points:
        axis.scatter(paper, ours, color=colours.get(verdict, "#8172b2"), zorder=3)
    values = [v for p in points for v in p[:2]]
    low, high = min(values), max(values)
    pad = 0.05 * (high - low or 1.0)
    span = (low - pad, high + pad)
    axis.plot(span, span, color="black", linewidth=0.8)
    tolerance = table.get("tolerance") or 0
    axis.fill_between(span, [s - tolerance for s in span], [s + tolerance for s in span],
                      color="#cccccc", alpha=0.5, label=f"within {tolerance:g} of the paper")
    title = "ours against the paper"
    if not table.get("comparable", False):
        title += " (quick profile: not comparable)"
    axis.set(title=title, xlabel="paper", ylabel="ours", xlim=span, ylim=span)
    axis.legend(fontsize="small")
    figure.tight_layout()
    return figure


@FIGURES.register("curves_over_eps")
def curves_over_eps(job: Any, table: dict[str, Any]) -> Figure | None:
    """The figure tables (IBP Figure 3, BCP Figure 4): each column over the certification eps,
    one line per row group (a trained model), where a group has rows at several eps."""
    configs = {row.name: row.config for row in job.rows}
    groups: dict[str, list[tuple[float, dict[str, Any]]]] = {}
    for row in table.get("rows", []):
        config = configs.get(row.get("id")) or {}
        if config.get("eps") is not None:
            # A line is one trained model: the row group (a panel or a model) and its method.
            line = f"{row.get('group') or row['id']} [{config.get('method')}]"
            groups.setdefault(line, []).append((config["eps"], row))
    groups = {name: sorted(points, key=lambda p: p[0]) for name, points in groups.items()
              if len({p[0] for p in points}) > 1}
    columns = table.get("columns", [])
    if not groups or not columns:
        return None
    figure, axes = plt.subplots(1, len(columns), figsize=(5 * len(columns), 4), squeeze=False)
    for axis, column in zip(axes[0], columns):
        for name, points in groups.items():
            series = [(x, ((row.get("cells") or {}).get(column["key"]) or {}).get("reproduced"))
                      for x, row in points]
            series = [(x, y) for x, y in series if y is not None]
            if series:
                axis.plot(*zip(*series), marker="o", label=name)
        unit = f" ({column['unit']})" if column.get("unit") else ""
        axis.set(title=column["label"], xlabel="eps", ylabel=column["label"] + unit)
    for axis in axes[0]:
        if axis.get_legend_handles_labels()[0]:  # a panel may have no column values yet
            axis.legend(fontsize="x-small")
            break
    figure.tight_layout()
    return figure


# The paper-specific figures live in modules of their own; importing them registers them.
from . import figures_bounds, figures_lipschitz  # noqa: E402,F401


def render_all(job: Any, table: dict[str, Any]) -> dict[str, bytes]:
    """Every figure the job has something to draw for, as PNG bytes by name."""
    pngs = {name: render_png(name, job, table) for name in FIGURES.names()}
    return {name: png for name, png in pngs.items() if png is not None}


def available(job: Any, table: dict[str, Any]) -> list[str]:
    """Names of the figures this job has something to draw for."""
    names = []
    for name in FIGURES.names():
        figure = FIGURES.get(name)(job, table)
        if figure is not None:
            plt.close(figure)
            names.append(name)
    return names


def render_png(name: str, job: Any, table: dict[str, Any]) -> bytes | None:
    """The figure as PNG bytes, None when it has nothing to draw; an unknown name raises
    ValueError listing the known ones."""
    figure = FIGURES.get(name)(job, table)
    if figure is None:
        return None
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()

"""A finished (or partly finished) table: the spec's rows with our numbers beside the paper's.

`assemble` turns a spec and the outcomes of its rows (one per row and seed) into a JSON-ready
table: for each row and column our value (the mean over the seeds that succeeded, in the column's
unit), the paper's, the difference and a verdict. `render` writes that table as Markdown, CSV,
LaTeX, HTML or JSON.

Verdicts, per cell:
  within / off      |ours - paper| <= / > the column's tolerance (paper profile only)
  not comparable    quick profile, or the paper has no number
  n/a               the row ran but its results lack this metric (e.g. the certifier did not run)
  pending           some seed of the row is still queued or running
  not implemented   the row's method or certifier is not in certrepro yet
  failed / cancelled  no seed of the row succeeded
"""
from __future__ import annotations

import csv
import html
import io
import json
import math
import statistics
from dataclasses import dataclass
from typing import Any

from experiments import TableSpec
from experiments.schema import Column

FORMATS = ("md", "csv", "latex", "html", "json")
STATUSES = ("queued", "running", "succeeded", "failed", "cancelled", "not_implemented")
QUICK_NOTE = ("Profile 'quick': scaled-down runs (small data, few epochs, cheaper attack); "
              "its numbers are NOT comparable with the paper's.")
SMOKE_NOTE = ("Profile 'smoke': one epoch on a few examples, to check that the rows run; its "
              "numbers mean nothing.")
PAPER_NOTE = ("Profile 'paper': the paper's protocol; verdicts compare with the paper's numbers "
              "within an absolute tolerance of {tolerance} (column units).")
EMPTY = "\u2013"  # en dash: the paper has no number


@dataclass
class RowOutcome:
    row_id: str
    seed: int
    status: str  # one of STATUSES
    metrics: dict[str, Any]  # {"clean_acc": .., "pgd_acc": .., "verified_acc": {"ibp": ..}}
    error: str | None = None
    result: dict[str, Any] | None = None  # the whole row result (timing, history) when known


# ------------------------------------------------------------------------------------------------
# Assembly


def assemble(spec: TableSpec, outcomes: list[RowOutcome], profile: str) -> dict[str, Any]:
    """The JSON-ready table for the spec rows that have outcomes (in spec order)."""
    if profile not in ("quick", "paper", "smoke"):
        raise ValueError(f"unknown profile {profile!r}; allowed: quick, paper, smoke")
    for outcome in outcomes:
        if outcome.status not in STATUSES:
            raise ValueError(f"row {outcome.row_id!r} seed {outcome.seed}: unknown status "
                             f"{outcome.status!r}; allowed: {', '.join(STATUSES)}")
    by_row: dict[str, list[RowOutcome]] = {}
    for outcome in outcomes:
        by_row.setdefault(outcome.row_id, []).append(outcome)
    known = {row.id for row in spec.rows}
    comparable = profile == "paper"
    rows = []
    for row in spec.rows:
        if row.id not in by_row:
            continue
        row_outcomes = sorted(by_row[row.id], key=lambda o: o.seed)
        status = _row_status([o.status for o in row_outcomes])
        succeeded = [o for o in row_outcomes if o.status == "succeeded"]
        cells = {}
        for column in spec.columns:
            cells[column.key] = _cell(spec, column, row.reported.get(column.key), status,
                                      succeeded, comparable)
        rows.append({
            "id": row.id,
            "label": row.label,
            "group": row.group,
            "status": status,
            "seeds": [o.seed for o in row_outcomes],
            "seed_status": {str(o.seed): o.status for o in row_outcomes},
            "errors": [{"seed": o.seed, "error": o.error} for o in row_outcomes if o.error],
            "note": row.note,
            "devices": _devices(succeeded),
            "cells": cells,
        })
    for column in spec.columns:
        if column.speedup_over is not None:
            _add_speedups(rows, column.key, column.speedup_over)
    return {
        "spec": spec.name,
        "paper": spec.paper.model_dump(),
        "caption": spec.caption,
        "profile": profile,
        "comparable": comparable,
        "note": (PAPER_NOTE.format(tolerance=spec.tolerance) if comparable
                 else SMOKE_NOTE if profile == "smoke" else QUICK_NOTE),
        "tolerance": spec.tolerance,
        "columns": [{"key": c.key, "label": c.label, "metric": c.metric, "transform": c.transform,
                     "unit": _unit(c), "tolerance": spec.column_tolerance(c), "note": c.note,
                     "speedup_over": c.speedup_over}
                    for c in spec.columns],
        "devices": _devices([o for o in outcomes if o.status == "succeeded"]),
        "rows": rows,
        "unmatched_rows": sorted(set(by_row) - known),
    }


def _devices(outcomes: list[RowOutcome]) -> list[str]:
    """The devices the runs trained on (a result's `device`), for timing tables above all: times
    compare only on the same device."""
    return sorted({str(o.result["device"]) for o in outcomes
                   if o.result and o.result.get("device")})


def _add_speedups(rows: list[dict[str, Any]], key: str, baseline: str) -> None:
    """Each cell of column `key` gets `speedup` and `speedup_reported`: the time of its group's
    row labelled `baseline` over its own (ours and the paper's; None where a time is missing)."""
    for row in rows:
        base = next((r for r in rows if r["group"] == row["group"] and r["label"] == baseline),
                    None)
        cell = row["cells"][key]
        for side, out in (("reproduced", "speedup"), ("reported", "speedup_reported")):
            slow = base["cells"][key][side] if base is not None else None
            fast = cell[side]
            cell[out] = _round(slow / fast) if slow is not None and fast else None


def _row_status(statuses: list[str]) -> str:
    """One status for a row from its seeds' statuses."""
    if all(s == "not_implemented" for s in statuses):
        return "not_implemented"
    if "running" in statuses:
        return "running"
    if "queued" in statuses:
        return "queued"
    if all(s == "succeeded" for s in statuses):
        return "succeeded"
    if "succeeded" in statuses:
        return "partial"  # finished; some seeds failed or were cancelled
    if "failed" in statuses:
        return "failed"
    if "cancelled" in statuses:
        return "cancelled"
    return "not_implemented"


# How a column's `aggregate` combines the runs' values (already in the column's unit); `best` and
# `worst` pick a run by its raw metric (higher is better: metrics are accuracies), see _cell.
AGGREGATORS = {
    "single": statistics.fmean,
    "mean": statistics.fmean,
    "std": lambda values: statistics.stdev(values) if len(values) > 1 else None,
    "median": statistics.median,
    "q1": lambda values: _quartiles(values)[0],
    "q3": lambda values: _quartiles(values)[2],
}
REDUCERS = {"mean": statistics.fmean, "last": lambda xs: xs[-1], "max": max, "min": min}


def _quartiles(values: list[float]) -> list[float]:
    if len(values) == 1:
        return values * 3
    return statistics.quantiles(values, n=4, method="inclusive")


def column_value(outcome: RowOutcome, column: Column) -> float | None:
    """The raw number a run gives for `column`: from its metrics, or a per-epoch list of its
    timing or history reduced to one number."""
    if column.block == "metrics":
        return metric_value(outcome.metrics, column.metric)
    result = outcome.result or {}
    if column.block == "timing":
        series = (result.get("timing") or {}).get(column.metric)
    else:  # history: one dict of means per epoch
        series = [metric_value(epoch, column.metric) for epoch in result.get("history") or []]
    if not isinstance(series, list):
        return None
    series = [v for v in series if isinstance(v, (int, float)) and math.isfinite(v)]
    return float(REDUCERS[column.reduce or "mean"](series)) if series else None


def _cell(spec: TableSpec, column: Column, reported, status: str, succeeded: list[RowOutcome],
          comparable: bool) -> dict[str, Any]:
    raw = [v for v in (column_value(o, column) for o in succeeded) if v is not None]
    values = [transform(v, column.transform) for v in raw]
    ours = std = None
    if values and column.aggregate in ("best", "worst"):
        pick = max if column.aggregate == "best" else min
        ours = transform(pick(raw), column.transform)
    elif values:
        ours = AGGREGATORS[column.aggregate](values)
    if column.aggregate in ("single", "mean") and len(values) > 1:
        std = statistics.stdev(values)
    paper = reported.value if reported is not None else None
    diff = _round(ours - paper) if ours is not None and paper is not None else None
    tolerance = spec.column_tolerance(column)
    if status == "not_implemented":
        verdict = "not implemented"
    elif status in ("queued", "running"):
        verdict = "pending"
    elif status in ("failed", "cancelled"):
        verdict = status
    elif ours is None:
        verdict = "n/a"  # the row ran, its results lack this metric
    elif not comparable or paper is None:
        verdict = "not comparable"
    else:
        verdict = "within" if abs(diff) <= tolerance + 1e-9 else "off"
    return {
        "reproduced": _significant(ours),
        "n": len(values),
        "std": _significant(std),
        "reported": paper,
        "reported_note": reported.note if reported is not None else None,
        "source": reported.source.model_dump() if reported is not None and reported.source else None,
        "diff": _round(diff),
        "verdict": verdict,
    }


def _significant(value: float | None, digits: int = 9) -> float | None:
    """Our numbers to `digits` significant digits: float noise goes, and a raw metric far below 1
    (IBP Figure 4's areas, 1e-7) keeps its value, which rounding to 1e-6 would zero."""
    return None if value is None else float(f"{value:.{digits}g}") + 0.0


def _round(value: float | None) -> float | None:
    """Rounded to 1e-6 of the column's unit (no float noise like 4.4e-15 in a diff); no -0.0."""
    return None if value is None else round(value, 6) + 0.0


def metric_value(metrics: dict[str, Any] | None, path: str) -> float | None:
    """metrics["a"]["b"] for path "a.b"; None when missing or not a finite number."""
    value: Any = metrics or {}
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def transform(value: float, kind: str) -> float:
    if kind == "error_pct":
        return 100.0 * (1.0 - value)
    if kind == "acc_pct":
        return 100.0 * value
    if kind == "raw":
        return value
    raise ValueError(f"unknown transform {kind!r}; allowed: error_pct, acc_pct, raw")


def _unit(column: Column) -> str:
    return "%" if column.transform in ("error_pct", "acc_pct") else ""


# ------------------------------------------------------------------------------------------------
# Rendering


def render(table: dict[str, Any], fmt: str) -> str:
    """The table as text in `fmt` (one of FORMATS)."""
    renderers = {"md": _markdown, "csv": _csv, "latex": _latex, "html": _html, "json": _json}
    if fmt not in renderers:
        raise ValueError(f"unknown table format {fmt!r}; allowed: {', '.join(FORMATS)}")
    return renderers[fmt](table)


def _number(value: float | None, column: dict[str, Any]) -> str:
    if value is None:
        return EMPTY
    return f"{value:.2f}" if column["unit"] == "%" else f"{value:.4g}"


def _signed(value: float, column: dict[str, Any]) -> str:
    text = _number(abs(value), column)
    return ("-" if value < 0 and text.strip("0.") else "+") + text


def ours_text(cell: dict[str, Any], column: dict[str, Any]) -> str:
    """Our side of a cell: the number (with its std over seeds), or why there is none."""
    if cell["reproduced"] is None:
        return {"pending": "pending", "not implemented": "not implemented", "failed": "failed",
                "cancelled": "cancelled"}.get(cell["verdict"], "n/a")
    text = _number(cell["reproduced"], column)
    if cell["std"] is not None:
        text += f"\u00b1{_number(cell['std'], column)}"
    return text


def cell_text(cell: dict[str, Any], column: dict[str, Any], dash: str = EMPTY,
              plus_minus: str = "\u00b1") -> str:
    """'ours (paper, +diff)'; the paper's side is a dash when it has no number."""
    ours = ours_text(cell, column).replace("\u00b1", plus_minus)
    if cell["reported"] is None:
        return f"{ours} ({dash})"
    paper = _number(cell["reported"], column)
    if cell["diff"] is None:
        return f"{ours} ({paper})"
    mark = " *" if cell["verdict"] == "off" else ""
    return f"{ours} ({paper}, {_signed(cell['diff'], column)}){mark}"


def devices_text(table: dict[str, Any]) -> str:
    """'Ran on: ...' when the runs say their device, else ''."""
    devices = table.get("devices") or []
    return f"Ran on: {'; '.join(devices)}." if devices else ""


def times_text(value: float | None) -> str:
    """A speed-up as 'x12.0'; a dash when there is none."""
    return EMPTY if value is None else f"x{value:.1f}"


def speedup_text(cell: dict[str, Any]) -> str:
    """'x12.0 (x11.9)': our speed-up and, in brackets, the paper's (a dash when it has none)."""
    return f"{times_text(cell.get('speedup'))} ({times_text(cell.get('speedup_reported'))})"


def _column_header(column: dict[str, Any]) -> str:
    return column["label"] + (f" ({column['unit']})" if column["unit"] else "")


def display_columns(table: dict[str, Any]) -> list[tuple[str, dict[str, Any], Any]]:
    """(header, column, text of a cell) for each displayed column: each spec column, and after a
    timing column with `speedup_over` its speed-up column."""
    out = []
    for column in table["columns"]:
        out.append((_column_header(column), column, lambda cell, c=column: cell_text(cell, c)))
        if column.get("speedup_over"):
            out.append((f"Speed-up over {column['speedup_over']}", column, speedup_text))
    return out


def _header_lines(table: dict[str, Any]) -> list[str]:
    paper = table.get("paper") or {}
    title = f"{table['spec']}" + (f" ({paper.get('short')})" if paper.get("short") else "")
    note = " ".join(part for part in (table["note"], devices_text(table)) if part)
    lines = [title, table["caption"], note]
    lines.append("Cells: ours (paper, ours - paper); ours is the mean over seeds (\u00b1 std when "
                 f"more than one); {EMPTY} = no number in the paper"
                 + ("; * = off by more than the tolerance." if table["comparable"] else "."))
    return lines


def _legend_notes(table: dict[str, Any]) -> list[str]:
    notes = [f"{row['id']}: {row['note']}" for row in table["rows"] if row.get("note")]
    notes += [f"{row['id']} (seed {e['seed']}): {e['error']}" for row in table["rows"]
              for e in row["errors"]]
    return notes


def _markdown(table: dict[str, Any]) -> str:
    head = _header_lines(table)
    out = [f"**{_md(head[0])}**: {_md(head[1])}", "", f"_{_md(head[2])}_", "", _md(head[3]), ""]
    shown = display_columns(table)
    header = ["Group", "Row", "Status"] + [h for h, _, _ in shown]
    out.append("| " + " | ".join(_md(h) for h in header) + " |")
    out.append("|" + "---|" * len(header))
    for row in table["rows"]:
        cells = [row["group"], row["label"], _status(row["status"])]
        cells += [text(row["cells"][c["key"]]) for _, c, text in shown]
        out.append("| " + " | ".join(_md(c) for c in cells) + " |")
    errors = [f"- {_md(line)}" for line in _legend_notes(table)]
    if errors:
        out += ["", "Notes:", ""] + errors
    return "\n".join(out) + "\n"


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _status(status: str) -> str:
    return status.replace("_", " ")


def _csv(table: dict[str, Any]) -> str:
    columns = table["columns"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    header = ["spec", "profile", "group", "row_id", "label", "status"]
    for c in columns:
        header += [f"{c['key']}_{part}" for part in ("ours", "std", "n", "paper", "diff", "verdict")]
        if c.get("speedup_over"):
            header += [f"{c['key']}_speedup_ours", f"{c['key']}_speedup_paper"]
    writer.writerow(header + ["devices"])
    for row in table["rows"]:
        line = [table["spec"], table["profile"], row["group"], row["id"], row["label"], row["status"]]
        for c in columns:
            cell = row["cells"][c["key"]]
            line += [_plain(cell["reproduced"]), _plain(cell["std"]), cell["n"],
                     _plain(cell["reported"]), _plain(cell["diff"]), cell["verdict"]]
            if c.get("speedup_over"):
                line += [_plain(cell.get("speedup")), _plain(cell.get("speedup_reported"))]
        writer.writerow(line + ["; ".join(row.get("devices") or [])])
    return buffer.getvalue()


def _plain(value: float | None) -> str:
    return "" if value is None else f"{value:.6g}"


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "%": r"\%", "_": r"\_", "&": r"\&", "#": r"\#",
                  "$": r"\$", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                  "^": r"\textasciicircum{}", "\u00b1": r"$\pm$", EMPTY: "--", "<": r"\textless{}",
                  ">": r"\textgreater{}"}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def _latex(table: dict[str, Any]) -> str:
    shown = display_columns(table)
    head = _header_lines(table)
    out = [f"% {line}" for line in (latex_escape(h) for h in head)]
    out += [r"\begin{table}[t]", r"\centering", r"\small",
            r"\caption{" + latex_escape(f"{head[0]}: {head[1]} {head[2]}") + "}",
            r"\begin{tabular}{lll" + "r" * len(shown) + "}", r"\hline"]
    header = ["Group", "Row", "Status"] + [h for h, _, _ in shown]
    out.append(" & ".join(latex_escape(h) for h in header) + r" \\")
    out.append(r"\hline")
    for row in table["rows"]:
        cells = [row["group"], row["label"], _status(row["status"])]
        cells += [text(row["cells"][c["key"]]) for _, c, text in shown]
        out.append(" & ".join(latex_escape(c) for c in cells) + r" \\")
    out += [r"\hline", r"\end{tabular}", r"\end{table}"]
    return "\n".join(out) + "\n"


def _html(table: dict[str, Any]) -> str:
    e = html.escape
    head = _header_lines(table)
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           f"<title>{e(head[0])}</title>",
           "<style>table{border-collapse:collapse}td,th{border:1px solid #999;padding:2px 6px}"
           "td.num{text-align:right}.off{color:#b00}.note{font-style:italic}</style>",
           "</head>", "<body>", f"<h1>{e(head[0])}</h1>", f"<p>{e(head[1])}</p>",
           f'<p class="note">{e(head[2])}</p>', f"<p>{e(head[3])}</p>", "<table>", "<thead>"]
    shown = display_columns(table)
    header = ["Group", "Row", "Status"] + [h for h, _, _ in shown]
    out.append("<tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>")
    out += ["</thead>", "<tbody>"]
    for row in table["rows"]:
        cells = [f"<td>{e(row['group'])}</td>", f"<td>{e(row['label'])}</td>",
                 f"<td>{e(_status(row['status']))}</td>"]
        for _, c, text in shown:
            cell = row["cells"][c["key"]]
            css = "num off" if cell["verdict"] == "off" else "num"
            cells.append(f'<td class="{css}" title="{e(cell["verdict"])}">'
                         f"{e(text(cell))}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out += ["</tbody>", "</table>"]
    notes = _legend_notes(table)
    if notes:
        out += ["<ul>"] + [f"<li>{e(line)}</li>" for line in notes] + ["</ul>"]
    out += ["</body>", "</html>"]
    return "\n".join(out) + "\n"


def _json(table: dict[str, Any]) -> str:
    return json.dumps(table, indent=2, allow_nan=False)

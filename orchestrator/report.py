"""The report page of a job (`GET /jobs/{id}/report`): one self-contained HTML page with the job's
state, its rows' progress, its table with ours and the paper's numbers side by side, and its
figures. Plain HTML and CSS, no JavaScript: while the job is still queued or running the page
asks the browser to reload itself (a `<meta http-equiv="refresh">`), so it is live without a
framework.
"""
from __future__ import annotations

import html
from typing import Any
from urllib.parse import urlencode

from .tables import EMPTY, QUICK_NOTE, devices_text, ours_text, times_text

TERMINAL = ("succeeded", "failed", "cancelled")
STYLE = """
body{font-family:sans-serif;margin:1.5em;max-width:80em}
table{border-collapse:collapse;margin:0.5em 0 1.5em}
td,th{border:1px solid #aaa;padding:2px 8px}
th{background:#eee}
td.num{text-align:right;font-variant-numeric:tabular-nums}
td.paper{background:#f6f6ff}
.within{color:#176b2c}.off{color:#b00020}.muted{color:#666}
.status{font-weight:bold}
img{max-width:100%;border:1px solid #ddd;margin:0.5em 0}
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _progress(row: Any) -> str:
    progress = row.progress or {}
    if progress.get("note"):  # e.g. waiting for the row that trains this row's model
        return str(progress["note"])
    epoch, epochs = progress.get("epoch"), progress.get("epochs")
    if epoch is None or not epochs:
        return EMPTY
    return f"epoch {epoch}/{epochs}"


def _rows_section(job: Any) -> list[str]:
    out = ["<h2>Rows</h2>", "<table id=\"rows\">",
           "<tr><th>row</th><th>seed</th><th>status</th><th>progress</th><th>attempts</th>"
           "<th>error</th></tr>"]
    for row in job.rows:
        out.append(f"<tr><td>{_e(row.name)}</td><td class=\"num\">{_e(row.seed)}</td>"
                   f"<td class=\"status\">{_e(row.status)}</td><td>{_e(_progress(row))}</td>"
                   f"<td class=\"num\">{_e(row.attempts)}</td><td>{_e(row.error or '')}</td></tr>")
    out.append("</table>")
    return out


def _table_section(table: dict[str, Any]) -> list[str]:
    """Per column: ours, the paper's, the difference and the verdict, as separate cells."""
    columns = table.get("columns", [])
    sped = [c for c in columns if c.get("speedup_over")]
    out = ["<h2>Table</h2>", f"<p>{_e(table.get('caption'))}</p>",
           f"<p class=\"muted\">{_e(table.get('note') or QUICK_NOTE)}</p>",
           f"<p id=\"devices\">{_e(devices_text(table))}</p>" if devices_text(table) else "",
           "<table id=\"results\">", "<tr><th rowspan=\"2\">row</th><th rowspan=\"2\">status</th>"
           + "".join(f"<th colspan=\"4\">{_e(c['label'])}{_e(' (' + c['unit'] + ')' if c['unit'] else '')}</th>"
                     for c in columns)
           + "".join(f"<th colspan=\"2\">speed-up over {_e(c['speedup_over'])}</th>" for c in sped)
           + "</tr>",
           "<tr>" + "<th>ours</th><th>paper</th><th>diff</th><th>verdict</th>" * len(columns)
           + "<th>ours</th><th>paper</th>" * len(sped) + "</tr>"]
    for row in table.get("rows", []):
        cells = [f"<td>{_e(row['label'])}</td>", f"<td class=\"status\">{_e(row['status'])}</td>"]
        for column in columns:
            cell = row["cells"][column["key"]]
            ours = ours_text(cell, column)
            paper = EMPTY if cell["reported"] is None else f"{cell['reported']:g}"
            title = ""
            if cell.get("source"):
                source = cell["source"]
                title = f" title=\"{_e(source['file'])}: {_e(source['table'])}, {_e(source['row'])}, {_e(source['column'])}\""
            diff = EMPTY if cell["diff"] is None else f"{cell['diff']:+.2f}"
            verdict = cell["verdict"]
            cells += [f"<td class=\"num\">{_e(ours)}</td>",
                      f"<td class=\"num paper\"{title}>{_e(paper)}</td>",
                      f"<td class=\"num\">{_e(diff)}</td>",
                      f"<td class=\"{_e(verdict.replace(' ', '-'))}\">{_e(verdict)}</td>"]
        for column in sped:
            cell = row["cells"][column["key"]]
            cells += [f"<td class=\"num\">{_e(times_text(cell.get('speedup')))}</td>",
                      f"<td class=\"num paper\">{_e(times_text(cell.get('speedup_reported')))}</td>"]
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return out


def report_html(job: Any, table: dict[str, Any] | None, figure_names: list[str],
                refresh_seconds: int = 10, key: str | None = None) -> str:
    """The page for `job` (a JobView), its assembled `table` (None if it has none) and the
    names of the figures it can show (served at figures/<name>, relative to this page; with
    `key`, the API key the page was opened with, carried on to them)."""
    query = "?" + urlencode({"key": key}) if key else ""
    live = job.status not in TERMINAL
    title = f"certrepro job {job.id}"
    if job.spec:
        title += f": {job.spec} ({job.profile})"
    head = ["<!DOCTYPE html>", "<html lang=\"en\">", "<head>", "<meta charset=\"utf-8\">",
            f"<title>{_e(title)}</title>", f"<style>{STYLE}</style>"]
    if live:
        head.append(f"<meta http-equiv=\"refresh\" content=\"{int(refresh_seconds)}\">")
    body = ["</head>", "<body>", f"<h1>{_e(title)}</h1>",
            f"<p>kind <b>{_e(job.kind)}</b>, status <b id=\"job-status\">{_e(job.status)}</b>, "
            f"created {_e(job.created_at)}, updated {_e(job.updated_at)}"
            + (f" &middot; this page reloads every {int(refresh_seconds)} s while the job runs"
               if live else "") + "</p>"]
    if job.error:
        body.append(f"<p class=\"off\">error: {_e(job.error)}</p>")
    body += _rows_section(job)
    if table is not None:
        body += _table_section(table)
    if figure_names:
        body.append("<h2>Figures</h2>")
        for name in figure_names:
            body.append(f"<figure><img src=\"figures/{_e(name)}{_e(query)}\" alt=\"{_e(name)}\">"
                        f"<figcaption>{_e(name.replace('_', ' '))}</figcaption></figure>")
    body += ["</body>", "</html>"]
    return "\n".join(head + body) + "\n"

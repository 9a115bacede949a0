"""The table of a sweep job, in the same shape (and through the same renderers) as a paper table.

- A sweep of a spec that is a sweep in itself (003 Table 3, Local-Lip Table 6): the spec's rows
  are the paper's grid points; each trial lands in the row whose swept fields have its values,
  so the table shows the grid as the paper does, our numbers beside the paper's. Grid points
  with no trial yet are pending.
- Any other sweep: one row per trial, labelled by its sampled values, with clean, PGD and
  verified columns and the sweep's metric; the best trial is marked.
"""
from __future__ import annotations

from typing import Any

import experiments
from experiments.schema import Column, Paper, Row, TableSpec

from .store import JobView
from .sweep_state import best_trial, unflatten
from .tables import RowOutcome, assemble

# trial status -> the row status a table cell knows
OUTCOME = {"queued": "queued", "running": "running", "succeeded": "succeeded",
           "stopped": "cancelled", "failed": "failed", "cancelled": "cancelled"}


def sweep_table(job: JobView) -> dict[str, Any]:
    sweep = job.body.get("_sweep") or {}
    source = sweep.get("source") or {}
    profile = source.get("profile") or job.profile or "quick"
    spec = experiments.load_spec(source["spec"]) if source.get("spec") else None
    if spec is not None and spec.sweep is not None and not source.get("row"):
        table = assemble(spec, grid_outcomes(spec, job.trials), profile)
    else:
        spec = trials_spec(job, sweep)
        table = assemble(spec, [_outcome(t["trial_id"], 0, t) for t in job.trials], profile)
    table["sweep"] = {"metric": sweep.get("metric"), "mode": sweep.get("mode"),
                      "search_space": sweep.get("search_space"),
                      "best": best_trial(job.trials, sweep.get("metric", ""),
                                         sweep.get("mode", "max"))}
    return table


def grid_outcomes(spec: TableSpec, trials: list[dict[str, Any]]) -> list[RowOutcome]:
    """One outcome per trial in the row of its grid point (seed: the trial's sample number);
    grid points without a trial yet are queued."""
    outcomes, counts = [], {}
    for trial in trials:
        row_id = experiments.row_for_sample(spec, trial.get("params") or {})
        if row_id is None:
            continue  # a point outside the paper's grid: shown in the trial list, not the table
        outcomes.append(_outcome(row_id, counts.get(row_id, 0), trial))
        counts[row_id] = counts.get(row_id, 0) + 1
    outcomes += [RowOutcome(row.id, 0, "queued", {}) for row in spec.rows if row.id not in counts]
    return outcomes


def _outcome(row_id: str, seed: int, trial: dict[str, Any]) -> RowOutcome:
    status = OUTCOME.get(trial.get("status"), "queued")
    metrics = unflatten(trial.get("metrics") or {}) if trial.get("final") else {}
    if status == "succeeded" and not trial.get("final"):
        status = "cancelled"
    return RowOutcome(row_id, seed, status, metrics, trial.get("error"))


def trials_spec(job: JobView, sweep: dict[str, Any]) -> TableSpec:
    """A table spec whose rows are the trials of a sweep (no paper)."""
    config = job.rows[0].config if job.rows else {}
    metric = sweep.get("metric") or "clean_acc"
    columns = [Column(key="clean", label="Test error", metric="clean_acc"),
               Column(key="pgd", label="PGD error", metric="pgd_acc")]
    columns += [Column(key=f"verified_{name}", label=f"Verified error ({name})",
                       metric=f"verified_acc.{name}") for name in config.get("certifiers", [])]
    if metric not in {c.metric for c in columns}:
        columns.append(Column(key="metric", label=metric, metric=metric, transform="raw"))
    best = best_trial(job.trials, metric, sweep.get("mode", "max"))
    rows = [Row(id=t["trial_id"], label=_label(t["params"]),
                group="best" if best and best["trial_id"] == t["trial_id"] else "",
                note="stopped early by the scheduler" if t.get("stopped_early") else None)
            for t in job.trials]
    caption = (f"Sweep of {config.get('method')} {config.get('model')} on "
               f"{config.get('dataset')}, {config.get('norm')} eps={config.get('eps')}: "
               f"{sweep.get('mode')} {metric}; one row per trial")
    return TableSpec(name=job.spec or "sweep", paper=Paper(title="(a sweep)", short="-"),
                     caption=caption, columns=columns, tolerance=0.0,
                     rows=rows or [Row(id="none", label="no trial yet")])


def _label(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items()) or "(no sampled values)"

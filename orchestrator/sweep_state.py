"""What a sweep's trials look like to the rest of the service: one plain record per Ray Tune trial
(status, sampled parameters, latest metrics, epoch, stopped early or not, its MLflow run, error),
the best trial, and the state file through which the sweep's driver (a Ray task) tells the
dispatcher about them (as a row's progress.json does for a row).

A trial reports `{"epoch": e, <metric>: v, "metrics": {...}}` after every epoch and, once its
model is certified, `{"final": 1, <metric>: v, "metrics": {...}}`. A trial that Tune ended
without its final report was stopped early by the scheduler.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from workers.files import write_json
from workers.recorder import read_progress

from .sweep_space import flat_sample

STATE_FILE = "sweep.json"
FINAL = "final"
TRIAL_TERMINAL = ("succeeded", "stopped", "failed", "cancelled")
# Ray Tune's trial statuses -> ours (TERMINATED splits into succeeded / stopped, see above)
TUNE_STATUS = {"PENDING": "queued", "PAUSED": "queued", "RUNNING": "running",
               "ERROR": "failed"}


def trial_record(trial: Any) -> dict[str, Any]:
    """The record of a `ray.tune.experiment.Trial`."""
    result = trial.last_result or {}
    final = bool(result.get(FINAL))
    if trial.status == "TERMINATED":
        status = "succeeded" if final else "stopped"
    else:
        status = TUNE_STATUS.get(trial.status, "queued")
    return {
        "trial_id": trial.trial_id,
        "status": status,
        "params": flat_sample(trial.config or {}),
        "metrics": dict(result.get("metrics") or {}),
        "epoch": int(result.get("epoch") or result.get("epochs") or 0),
        "final": final,
        "stopped_early": status == "stopped",
        "mlflow_run_id": result.get("mlflow_run_id"),
        "error": (f"failed {getattr(trial, 'num_failures', 1)} time(s); last: "
                  f"{_error_text(trial)}") if status == "failed" else None,
    }


def _error_text(trial: Any) -> str:
    """What the trial raised, as "Type: message" (the exception, not Ray's wrapper)."""
    try:
        error = trial.get_error()
    except Exception:  # no pickled error (an old trial, a lost file)
        error = None
    if error is not None:
        cause = getattr(error, "cause", None) or error
        return f"{type(cause).__name__}: {cause}"[:2000]
    try:
        return Path(trial.error_file).read_text().strip()[-2000:] or "the trial failed"
    except (OSError, TypeError):
        return "the trial failed (no error recorded)"


def metric_of(record: dict[str, Any], metric: str) -> float | None:
    value = (record.get("metrics") or {}).get(metric)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def best_trial(trials: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
    """The best trial by `metric`: among the certified (final) trials; while none is, the best
    so far by its latest per-epoch value. Ties go to the first trial id."""
    finals = [t for t in trials if t.get("final") and metric_of(t, metric) is not None]
    pool = finals or [t for t in trials if metric_of(t, metric) is not None]
    if not pool:
        return None
    sign = 1.0 if mode == "max" else -1.0
    best = max(sorted(pool, key=lambda t: t["trial_id"]),
               key=lambda t: sign * metric_of(t, metric))
    return {"trial_id": best["trial_id"], "params": best.get("params") or {},
            "metrics": best.get("metrics") or {}, "value": metric_of(best, metric),
            "final": bool(best.get("final")), "mlflow_run_id": best.get("mlflow_run_id")}


def write_state(workdir: str | Path, trials: list[dict[str, Any]], total: int, metric: str,
                mode: str) -> None:
    """sweep.json (every trial) and progress.json (trials ended of the total, and the best
    metrics so far) in the sweep row's work folder."""
    workdir = Path(workdir)
    write_json(workdir / STATE_FILE, {"trials": trials, "total": total}, indent=None)
    ended = sum(t["status"] in TRIAL_TERMINAL for t in trials)
    best = best_trial(trials, metric, mode)
    write_json(workdir / "progress.json",
               {"epoch": ended, "epochs": max(total, len(trials)),
                "metrics": _numbers(best["metrics"]) if best else {}}, indent=None)


def read_state(workdir: str | Path) -> dict[str, Any] | None:
    return read_progress(Path(workdir) / STATE_FILE)


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def unflatten(metrics: dict[str, Any]) -> dict[str, Any]:
    """{"verified_acc.ibp": v} -> {"verified_acc": {"ibp": v}} (the shape of a row's metrics)."""
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        node = out
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                break
        else:
            node[last] = value
    return out

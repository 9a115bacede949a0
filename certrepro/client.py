"""A small HTTP client of the certrepro API for the command line (submit, status, table)."""
from __future__ import annotations

import os
import sys
import time
from typing import Any

import httpx

TERMINAL = ("succeeded", "failed", "cancelled")


class ApiError(Exception):
    """The API answered with a problem, or could not be reached: printed as is."""


class Client:
    def __init__(self, url: str | None = None, api_key: str | None = None, timeout: float = 30):
        self.url = (url or os.environ.get("CERTREPRO_URL") or "http://127.0.0.1:8000").rstrip("/")
        key = api_key if api_key is not None else os.environ.get("CERTREPRO_API_KEY")
        self.http = httpx.Client(base_url=self.url, timeout=timeout,
                                 headers={"X-API-Key": key} if key else {})

    def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as error:
            raise ApiError(f"cannot reach the certrepro service at {self.url} ({error}); "
                           "start it with `certrepro serve` or set CERTREPRO_URL") from None
        if response.status_code >= 400:
            try:
                problem = response.json()
                message = problem.get("detail") or problem.get("title")
            except ValueError:
                message = response.text
            raise ApiError(f"{response.status_code}: {message}")
        return response

    def submit(self, body: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self.request("POST", "/jobs", json=body, headers=headers).json()

    def job(self, job_id: str) -> dict[str, Any]:
        return self.request("GET", f"/jobs/{job_id}").json()

    def table(self, job_id: str, fmt: str = "md") -> str:
        return self.request("GET", f"/jobs/{job_id}/table", params={"format": fmt}).text

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self.request("POST", f"/jobs/{job_id}/cancel").json()

    def wait_ready(self, timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                response = self.http.get("/readyz")
                if response.status_code == 200:
                    return response.json()
                last = response.text
            except httpx.HTTPError as error:
                last = str(error)
            time.sleep(0.5)
        raise ApiError(f"the service at {self.url} was not ready after {timeout:.0f} s: {last}")


def format_status(job: dict[str, Any], width: int = 24) -> str:
    """One line per row: status, attempts, a progress bar of epochs, the latest metrics."""
    lines = [f"job {job['id']}  {job['kind']}  {job['status']}"
             + (f"  {job.get('spec')}" if job.get("spec") else "")]
    for row in job["rows"]:
        epoch, epochs = row["progress"]["epoch"], max(row["progress"]["epochs"], 1)
        filled = int(width * epoch / epochs)
        metrics = row.get("metrics") or {}
        shown = "  ".join(f"{key} {metrics[key]:.3f}" for key in
                          ("clean_acc", "pgd_acc", "loss", "train_verified")
                          if isinstance(metrics.get(key), (int, float)))
        lines.append(f"  {row['name'][:28]:28} s{row['seed']:<3} {row['status']:9} "
                     f"[{'#' * filled}{'.' * (width - filled)}] {epoch}/{epochs}  "
                     f"attempts {row['attempts']}  {shown}"
                     + (f"\n      {row['progress']['note']}" if row["progress"].get("note") else "")
                     + (f"\n      error: {row['error']}" if row.get("error") else ""))
    if job["kind"] == "sweep":
        lines += format_trials(job)
    return "\n".join(lines)


def format_trials(job: dict[str, Any]) -> list[str]:
    """A sweep's trials, one line each (status, epoch, sampled values, the sweep's metric), and
    the best trial so far."""
    sweep = job.get("sweep") or {}
    metric = sweep.get("metric") or ""
    lines = [f"  sweep: {sweep.get('mode')} {metric}, {len(job.get('trials') or [])} of "
             f"{sweep.get('trials')} trials started"]
    lines += [trial_line(trial, metric) for trial in job.get("trials") or []]
    best = job.get("best")
    if best:
        values = ", ".join(f"{k}={v}" for k, v in best["params"].items())
        lines.append(f"  best{'' if best['final'] else ' so far'}: {best['trial_id']}  "
                     f"{metric} {best['value']:.4f}  {values}")
    return lines


def trial_line(trial: dict[str, Any], metric: str) -> str:
    values = ", ".join(f"{k}={v}" for k, v in (trial.get("params") or {}).items())
    value = (trial.get("metrics") or {}).get(metric)
    shown = f"{metric} {value:.4f}" if isinstance(value, (int, float)) else ""
    notes = ("  stopped early" if trial.get("stopped_early") else "") + (
        f"\n      error: {trial['error']}" if trial.get("error") else "")
    return (f"  trial {trial['trial_id']:14} {trial['status']:9} epoch {trial.get('epoch', 0):<4} "
            f"{shown:24} {values}{notes}")


def follow(client: Client, job_id: str, interval: float = 1.0, out=sys.stdout) -> dict[str, Any]:
    """Print a line for each row (or sweep trial) whose status or epoch changed, until the job
    ends; then the job's full status. Returns the final job."""
    seen: dict[str, tuple[str, int]] = {}
    while True:
        job = client.job(job_id)
        for row in job["rows"]:
            state = (row["status"], row["progress"]["epoch"])
            if seen.get(row["id"]) != state:
                seen[row["id"]] = state
                print(format_status({**job, "rows": [row]}).splitlines()[1], file=out, flush=True)
        for trial in job.get("trials") or []:
            state = (trial["status"], trial.get("epoch", 0))
            if seen.get(trial["trial_id"]) != state:
                seen[trial["trial_id"]] = state
                print(trial_line(trial, (job.get("sweep") or {}).get("metric", "")), file=out,
                      flush=True)
        if job["status"] in TERMINAL:
            print(format_status(job), file=out, flush=True)
            return job
        time.sleep(interval)

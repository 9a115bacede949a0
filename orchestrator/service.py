"""The service in one object: settings, job store, MLflow (a server child process in the embedded
default, or the server MLFLOW_TRACKING_URI names), Ray and the dispatcher. The API reads from it;
`certrepro serve` starts and stops it."""
from __future__ import annotations

import logging
import os
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import experiments
from workers.core.config import config_hash

from . import figures
from .settings import Settings
from .store import JobStore, JobView, RowView
from .tables import RowOutcome, assemble, render

log = logging.getLogger("certrepro.service")
TERMINAL = ("succeeded", "failed", "cancelled")
MLFLOW_STATUS = {"succeeded": "FINISHED", "failed": "FAILED", "cancelled": "KILLED"}


def git_commit() -> str:
    """The commit this code is: CERTREPRO_GIT_COMMIT (an image has no .git: its build sets it),
    else git's HEAD, else "unknown"."""
    if os.environ.get("CERTREPRO_GIT_COMMIT"):
        return os.environ["CERTREPRO_GIT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5, cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Tracking:
    """What the service records in MLflow: one experiment per table spec ("adhoc" for run jobs),
    a parent run per job, a nested run per row found again by its tags."""

    def __init__(self, tracker, store: JobStore):
        self.tracker, self.store = tracker, store
        self.commit = git_commit()

    @staticmethod
    def experiment(job: JobView) -> str:
        return job.spec or "adhoc"

    def job_run(self, job: JobView) -> str:
        if job.mlflow_run_id:
            return job.mlflow_run_id
        tags = {"certrepro.kind_of_job": job.kind, "certrepro.profile": job.profile or "",
                "certrepro.table": job.spec or "", "certrepro.git_commit": self.commit}
        run_id = self.tracker.job_run(self.experiment(job), job.id, tags,
                                      run_name=f"{job.spec or 'run'} {job.id[:8]}")
        self.store.set_job_mlflow_run(job.id, run_id)
        return run_id

    def row_recorder(self, row: RowView):
        job = self.store.get_job(row.job_id)
        parent = self.job_run(job)
        config = row.config
        spec = experiments.load_spec(job.spec) if job.spec else None
        tags = {"certrepro.paper": spec.paper.short if spec else "",
                "certrepro.table": job.spec or "", "certrepro.row": row.name,
                "certrepro.method": config["method"], "certrepro.dataset": config["dataset"],
                "certrepro.model": config["model"], "certrepro.profile": job.profile or "",
                "certrepro.seed": str(row.seed), "certrepro.config_hash": config_hash(config),
                "certrepro.git_commit": self.commit}
        return self.tracker.row_recorder(self.experiment(job), job.id, row.id, parent, tags,
                                         run_name=f"{row.name} seed {row.seed}")

    def row_ended(self, row_id: str, status: str) -> None:
        row = self.store.get_row(row_id)
        if row.mlflow_run_id:
            self.tracker.finish(row.mlflow_run_id, status)

    def job_progress(self, store: JobStore, row_id: str) -> None:
        """When a job ends: its table and figures on the parent run, and the parent run closed."""
        job = store.get_job(store.get_row(row_id).job_id)
        if job.status not in TERMINAL or not job.mlflow_run_id:
            return
        table = job_table(job)
        self.tracker.log_table(job.mlflow_run_id, render(table, "md"), render(table, "csv"),
                               table_rows(table))
        self.tracker.log_figures(job.mlflow_run_id, figures.render_all(job, table))
        self.tracker.finish(job.mlflow_run_id, MLFLOW_STATUS[job.status])


def job_table(job: JobView) -> dict[str, Any]:
    """The job's table so far: the spec's rows with our numbers beside the paper's (a sweep's:
    its trials, or the paper's grid for a spec that is a sweep)."""
    if job.kind == "sweep":
        from .sweep_report import sweep_table
        return sweep_table(job)
    spec = experiments.load_spec(job.spec) if job.spec else experiments.adhoc_spec(job.rows[0].config)
    outcomes = [RowOutcome(row.name if job.spec else spec.rows[0].id, row.seed, row.status,
                           (row.result or {}).get("metrics") or {}, row.error, row.result)
                for row in job.rows]
    left_out = (job.body.get("_left_out") or {}).get("rows", [])
    outcomes += [RowOutcome(item["row"], item["seed"], "not_implemented", {}, item["reason"])
                 for item in left_out]
    return assemble(spec, outcomes, job.profile or "quick")


def table_rows(table: dict[str, Any]) -> list[dict[str, Any]]:
    """Flat records of a table (one per row and column) for mlflow's log_table."""
    records = []
    for row in table.get("rows", []):
        for key, cell in (row.get("cells") or {}).items():
            records.append({"row": row.get("id"), "column": key,
                            **{k: v for k, v in cell.items() if not isinstance(v, (dict, list))}})
    return records


class Service:
    def __init__(self, settings: Settings | None = None, *, with_dispatcher: bool = True,
                 num_cpus: int | None = None):
        self.settings = settings or Settings.from_env()
        self.with_dispatcher = with_dispatcher
        self.num_cpus = num_cpus
        self.store = JobStore(self.settings.db_url)
        self.mlflow_server = None
        self.mlflow_uri: str | None = self.settings.mlflow_tracking_uri
        self.tracker = None
        self.tracking: Tracking | None = None
        self.executor = None
        self.dispatcher = None
        self._links: dict[str, str] = {}

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self.settings.home.mkdir(parents=True, exist_ok=True)
        self.settings.runs_dir.mkdir(parents=True, exist_ok=True)
        if self.mlflow_uri is None:
            self.mlflow_uri = self._start_mlflow_server()
        from .tracking import MLflowTracker
        self.tracker = MLflowTracker(self.mlflow_uri, self.settings.mlflow_public_url)
        self.tracking = Tracking(self.tracker, self.store)
        if self.with_dispatcher:
            from .dispatcher import Dispatcher
            from .execution import RayExecutor
            self.executor = RayExecutor(self.settings.ray_address, num_cpus=self.num_cpus,
                                        node_retries=self.settings.node_retries)
            self.dispatcher = Dispatcher(self.store, self.executor, self.settings, self.tracking)
            self.dispatcher.start()

    def _start_mlflow_server(self) -> str:
        from .mlflow_server import MLflowServer
        url = f"http://127.0.0.1:{self.settings.mlflow_port}"
        if self.settings.mlflow_port and _healthy(url):
            # left over from a service that was killed: it serves the same store, reuse it
            log.info("reusing the MLflow server already on %s", url)
            return url
        self.mlflow_server = MLflowServer(self.settings.home, self.settings.mlflow_port)
        self.mlflow_server.start()
        return self.mlflow_server.url

    def stop(self) -> None:
        if self.dispatcher is not None:
            self.dispatcher.stop(release=True)
        if self.executor is not None:
            self.executor.shutdown()
        if self.mlflow_server is not None:
            self.mlflow_server.stop()
        self.store.close()
        log.info("certrepro service stopped")

    # -- what the API reads ---------------------------------------------------------------------

    def run_link(self, run_id: str | None) -> str | None:
        if not run_id or self.tracker is None:
            return None
        if run_id not in self._links:  # a run's link never changes: ask MLflow once
            try:
                self._links[run_id] = self.tracker.run_link(run_id)
            except Exception:  # MLflow unreachable: the job is still readable
                return None
        return self._links[run_id]

    def job_table(self, job: JobView) -> dict[str, Any]:
        return job_table(job)

    def readiness(self) -> dict[str, Any]:
        store_ok = _safe(self.store.ping)
        ray_state = self.executor.ready() if self.executor is not None else {"initialized": False}
        ray_ok = bool(ray_state.get("initialized")) or not self.with_dispatcher
        mlflow_ok = bool(self.mlflow_uri) and _healthy(self.mlflow_uri)
        return {"ready": store_ok and ray_ok and mlflow_ok,
                "store": {"ok": store_ok, "dialect": self.store.dialect},
                "ray": {"ok": ray_ok, **ray_state},
                "mlflow": {"ok": mlflow_ok},
                "mlflow_tracking_uri": self.mlflow_uri,
                "mlflow_ui": self.tracker.ui_base if self.tracker is not None else None}


def _safe(check) -> bool:
    try:
        return bool(check())
    except Exception:
        return False


def _healthy(url: str) -> bool:
    if not url.startswith("http"):
        return True  # a local file store needs no server
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False

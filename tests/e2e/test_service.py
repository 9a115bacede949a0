"""The whole service as users run it: `certrepro serve` as a real process (API, dispatcher, a
local Ray), a real MLflow server, the job store on SQLite and on PostgreSQL."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from certrepro.client import Client
from orchestrator.mlflow_server import MLflowServer
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
TINY_RUN = {"method": "ibp", "dataset": "digits-8x8", "model": "mlp2x100", "eps": 0.05,
            "epochs": 2, "batch_size": 64, "train_limit": 300, "test_limit": 40,
            "attack": {"steps": 5, "restarts": 1}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    server = MLflowServer(tmp_path_factory.mktemp("mlflow"), port=0)
    server.start()
    yield server
    server.stop()


class ServiceProcess:
    def __init__(self, home: Path, db_url: str, mlflow_url: str, lease: float = 30):
        self.port = free_port()
        self.env = os.environ | {
            "CERTREPRO_HOME": str(home), "CERTREPRO_DB_URL": db_url,
            "MLFLOW_TRACKING_URI": mlflow_url, "CERTREPRO_LEASE_SECONDS": str(lease),
            "CERTREPRO_POLL_SECONDS": "0.3", "PYTHONPATH": str(REPO), "CERTREPRO_DOWNLOAD": "0"}
        self.log = home / f"service-{self.port}.log"
        self.process: subprocess.Popen | None = None
        self.client = Client(f"http://127.0.0.1:{self.port}")

    def start(self) -> "ServiceProcess":
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "certrepro", "serve", "--port", str(self.port),
             "--num-cpus", "2"], env=self.env, cwd=self.log.parent,
            stdout=self.log.open("ab"), stderr=subprocess.STDOUT)
        try:
            self.client.wait_ready(timeout=120)
        except Exception:
            self.stop()
            raise AssertionError(f"service did not start:\n{self.log.read_text()[-3000:]}")
        return self

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def wait_for(predicate, timeout: float, what: str, interval: float = 0.3):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def finished(client: Client, job_id: str, timeout: float = 300) -> dict:
    return wait_for(lambda: (lambda j: j if j["status"] in ("succeeded", "failed", "cancelled")
                             else None)(client.job(job_id)), timeout, f"job {job_id} to end", 1.0)


def test_run_and_table_jobs_end_to_end(db_url, mlflow_server, tmp_path):
    service = ServiceProcess(tmp_path, db_url, mlflow_server.url).start()
    try:
        client = service.client
        ready = client.wait_ready()
        assert ready["mlflow_tracking_uri"] == mlflow_server.url
        run_job = client.submit({"kind": "run", "config": TINY_RUN})
        table_job = client.submit({"kind": "table", "spec": "demo/digits",
                                   "rows": ["nominal", "ibp"], "profile": "quick"})
        run_job = finished(client, run_job["id"])
        table_job = finished(client, table_job["id"])
        assert run_job["status"] == "succeeded", run_job
        assert table_job["status"] == "succeeded", table_job
        for row in run_job["rows"] + table_job["rows"]:
            assert row["status"] == "succeeded" and row["attempts"] == 1
            assert row["progress"]["epoch"] == row["progress"]["epochs"]
            assert 0 <= row["metrics"]["clean_acc"] <= 1
            assert row["mlflow_run_id"] and row["mlflow_url"].startswith("http")
        ibp = next(r for r in table_job["rows"] if r["name"] == "ibp")
        nominal = next(r for r in table_job["rows"] if r["name"] == "nominal")
        assert ibp["metrics"]["verified_acc"]["ibp"] > nominal["metrics"]["verified_acc"]["ibp"]

        for fmt in ("md", "csv", "latex", "html", "json"):
            text = client.table(table_job["id"], fmt)
            assert "ibp" in text.lower() and "nominal" in text.lower()

        mlflow = MlflowClient(mlflow_server.url)
        for row in table_job["rows"]:
            run = mlflow.get_run(row["mlflow_run_id"])
            assert run.data.tags["certrepro.row"] == row["name"]
            assert run.data.tags["certrepro.table"] == "demo/digits"
            assert run.data.tags["mlflow.parentRunId"] == table_job["mlflow_run_id"]
            assert run.data.params["method"] == row["name"]
            assert "clean_acc" in run.data.metrics and "verified_acc.ibp" in run.data.metrics
            history = mlflow.get_metric_history(run.info.run_id, "sec_per_epoch")
            assert sorted(m.step for m in history) == list(range(1, row["progress"]["epochs"] + 1))
            artifacts = {a.path for a in mlflow.list_artifacts(run.info.run_id)}
            assert {"checkpoint.pt", "result.json"} <= artifacts
            assert run.info.status == "FINISHED"
        parent = mlflow.get_run(table_job["mlflow_run_id"])
        assert {"table.md", "table.csv"} <= {a.path for a in mlflow.list_artifacts(parent.info.run_id)}
        # The figures are logged when the job ends, just after its status turns final.
        wanted = {"figures/training_curves.png", "figures/seconds_per_epoch.png"}
        wait_for(lambda: wanted <= {a.path for a in mlflow.list_artifacts(parent.info.run_id,
                                                                           "figures")},
                 30, "the job's figures on its MLflow run", 0.5)
    finally:
        code = service.stop()
    # SIGTERM is a clean shutdown (uvicorn re-raises the signal once it has shut down)
    assert code in (0, -signal.SIGTERM) and "certrepro service stopped" in service.log.read_text()


def test_cancel_stops_a_running_row_and_failing_rows_are_retried(db_url, mlflow_server, tmp_path):
    service = ServiceProcess(tmp_path, db_url, mlflow_server.url)
    service.env |= {"CERTREPRO_MAX_ATTEMPTS": "2", "CERTREPRO_DATA": str(tmp_path / "no-data")}
    service.start()
    try:
        client = service.client
        # a row that fails on every attempt (its data set is missing): retried, then failed
        broken = client.submit({"kind": "run", "config": dict(TINY_RUN, dataset="mnist",
                                                               model="mlp2x100")})
        broken = finished(client, broken["id"], timeout=120)
        row = broken["rows"][0]
        assert broken["status"] == "failed" and row["status"] == "failed"
        assert row["attempts"] == 2 and [a["outcome"] for a in row["attempt_log"]] == ["failed"] * 2
        assert "DataNotFound" in row["error"] and "mnist" in row["error"]
        assert broken["error"] == row["error"]

        long_run = dict(TINY_RUN, dataset="digits", model="small", epochs=200, train_limit=None)
        job = client.submit({"kind": "run", "config": long_run})
        wait_for(lambda: client.job(job["id"])["rows"][0]["progress"]["epoch"] >= 1, 120,
                 "the row to start")
        client.cancel(job["id"])
        job = finished(client, job["id"], timeout=60)
        assert job["status"] == "cancelled" and job["rows"][0]["status"] == "cancelled"
        epoch = job["rows"][0]["progress"]["epoch"]
        time.sleep(3)
        assert client.job(job["id"])["rows"][0]["progress"]["epoch"] == epoch  # it stopped
    finally:
        service.stop()


def test_killed_service_resumes_the_row_from_its_checkpoint(db_url, mlflow_server, tmp_path):
    config = dict(TINY_RUN, dataset="digits", model="small", epochs=12, train_limit=None)
    first = ServiceProcess(tmp_path, db_url, mlflow_server.url, lease=4).start()
    job = first.client.submit({"kind": "run", "config": config})
    wait_for(lambda: first.client.job(job["id"])["rows"][0]["progress"]["epoch"] >= 3, 180,
             "epoch 3")
    first.stop(signal.SIGKILL)  # no clean shutdown: the row's lease must expire
    second = ServiceProcess(tmp_path, db_url, mlflow_server.url, lease=4).start()
    try:
        job = finished(second.client, job["id"], timeout=300)
        row = job["rows"][0]
        assert job["status"] == "succeeded", job
        assert row["attempts"] == 2
        assert [a["outcome"] for a in row["attempt_log"]] == ["lost", "succeeded"]
        mlflow = MlflowClient(mlflow_server.url)
        runs = mlflow.search_runs(
            [mlflow.get_experiment_by_name("adhoc").experiment_id],
            filter_string=f"tags.`certrepro.row_id` = '{row['id']}'")
        assert len(runs) == 1 and runs[0].info.run_id == row["mlflow_run_id"]
        steps = [m.step for m in mlflow.get_metric_history(row["mlflow_run_id"], "sec_per_epoch")]
        assert steps.count(1) == 1, steps  # resumed from the checkpoint, not trained again
        assert len(set(range(1, 13)) - set(steps)) <= 1, steps  # at most the epoch cut by the kill
    finally:
        second.stop()

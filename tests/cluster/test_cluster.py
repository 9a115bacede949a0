"""The cluster of docker-compose.yml as real processes on this machine's loopback: the local
PostgreSQL server with one throwaway database for MLflow and one for the job store, `mlflow db
upgrade` then `mlflow server` on PostgreSQL, a Ray head and Ray worker nodes started by the
images' own entrypoint (docker/entrypoint.sh), and `certrepro serve` pointed at all three. A
table job runs through it; the worker node running its row is killed mid-row, and the row
finishes on another node from its checkpoint, in its one MLflow run.

What differs from the containers: every node shares one machine (each with its own Ray temp
folder, so one node can be killed alone), the shared volume is a folder of this machine, the API's
Ray driver attaches to the head's node instead of joining as a node of its own, and the Ray
dashboard is off (the project's Ray has no `ray[default]`; the images have it)."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from certrepro.client import Client
from orchestrator.mlflow_server import MLflowServer, _group_pids, _killpg
from tests.e2e.test_service import ServiceProcess, finished, free_port, wait_for

from .compose import COMPOSE, ENV_EXAMPLE, REPO, load, option, read_env_file

pytestmark = [pytest.mark.slow, pytest.mark.timeout(540)]
ENTRYPOINT = REPO / "docker" / "entrypoint.sh"
HEALTHCHECK = REPO / "docker" / "healthcheck.py"
VENV_BIN = Path(sys.executable).parent
# small nodes: these machines have 2 cores shared with other work
NODE_OPTIONS = ["--node-ip-address=127.0.0.1", "--object-store-memory=100000000"]


class ProcessGroups:
    """Processes started each in a session of its own, so that one can be killed with everything
    it started (a Ray node: raylet, agents, workers) and nothing else; `stop_all` ends every one."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.processes: dict[str, subprocess.Popen] = {}

    def start(self, name: str, command: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = (self.logs / f"{name}.log").open("ab")
        process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.processes[name] = process
        return process

    def kill(self, name: str, sig: int = signal.SIGKILL, timeout: float = 20) -> None:
        pgid = self.processes[name].pid
        _killpg(pgid, sig)
        deadline = time.monotonic() + timeout
        while _group_pids(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)
        while _group_pids(pgid):  # SIGTERM not heeded in time
            _killpg(pgid, signal.SIGKILL)
            time.sleep(0.2)
        self.processes[name].wait(timeout=10)

    def stop_all(self) -> None:
        for name in list(self.processes):
            self.kill(name, signal.SIGTERM, timeout=15)

    def wait_started(self, name: str, timeout: float = 120) -> None:
        """Until `ray start` says the node is up; fails at once, with its log, if it exited."""
        def started() -> bool:
            if self.processes[name].poll() is not None:
                raise AssertionError(f"{name} exited:\n{self.tail(name)}")
            return "Ray runtime started" in self.tail(name, lines=200)
        wait_for(started, timeout, f"{name} to start")

    def tail(self, name: str, lines: int = 40) -> str:
        text = (self.logs / f"{name}.log").read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])


class PostgresMLflow(MLflowServer):
    """The compose `mlflow` service on loopback: `mlflow server` on a PostgreSQL database."""

    def __init__(self, home: Path, backend_uri: str, allowed_hosts: str):
        super().__init__(home, port=0, workers=1,
                         extra_args=["--allowed-hosts", allowed_hosts])
        self.backend_uri = backend_uri

    @property
    def backend_store_uri(self) -> str:
        return self.backend_uri


def healthy(*urls: str) -> bool:
    """docker/healthcheck.py, as the compose healthchecks run it."""
    return subprocess.run([sys.executable, str(HEALTHCHECK), *urls], capture_output=True,
                          timeout=30).returncode == 0


def ray_nodes(address: str, env: dict[str, str]) -> list[dict]:
    """The cluster's nodes as the GCS lists them (a short-lived driver of its own)."""
    script = ("import json, ray; ray.init(address=%r, logging_level='ERROR'); "
              "print(json.dumps(ray.nodes(), default=str))" % address)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture
def cluster_env(tmp_path):
    """The environment the compose file gives the certrepro containers, on loopback."""
    env = os.environ | {"PATH": f"{VENV_BIN}:{os.environ['PATH']}", "PYTHONPATH": str(REPO),
                        "RAY_USAGE_STATS_ENABLED": "0", "CERTREPRO_DOWNLOAD": "0",
                        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
                        "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
                        # as in the compose file: token authentication, one token on every node
                        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    for name in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "CERTREPRO_DB_URL"):
        env.pop(name, None)
    return env


def test_a_row_survives_the_loss_of_its_worker_node(make_postgres_db, tmp_path, cluster_env):
    services = load(COMPOSE, read_env_file(ENV_EXAMPLE))["services"]
    shared = tmp_path / "shared"  # the compose `shared` volume
    # Ray's socket paths must stay short (a Unix socket path has at most 107 bytes)
    ray_temp = Path(tempfile.mkdtemp(prefix="crc-", dir="/tmp"))
    groups = ProcessGroups(tmp_path)
    mlflow = service = None
    try:
        # PostgreSQL: a database each for MLflow and the job store; MLflow's schema first
        mlflow_db, jobs_db = make_postgres_db(), make_postgres_db()
        upgrade = subprocess.run([str(VENV_BIN / "mlflow"), "db", "upgrade", mlflow_db],
                                 capture_output=True, text=True, timeout=180, env=cluster_env)
        assert upgrade.returncode == 0, upgrade.stderr[-3000:]
        allowed = option(services["mlflow"]["command"], "--allowed-hosts")
        mlflow = PostgresMLflow(tmp_path / "mlflow", mlflow_db, allowed).start(timeout=120)
        assert healthy(f"{mlflow.url}/health")

        # Ray: the head (no CPUs: rows run on workers only) and worker node A with one CPU
        ray_port = free_port()
        address = f"127.0.0.1:{ray_port}"
        head_env = cluster_env | {"RAY_PORT": str(ray_port), "RAY_DASHBOARD_PORT": str(free_port())}
        groups.start("ray-head", ["sh", str(ENTRYPOINT), "ray-head", *NODE_OPTIONS,
                                  "--include-dashboard=false",
                                  f"--dashboard-agent-listen-port={free_port()}",
                                  f"--temp-dir={ray_temp / 'head'}"], head_env)

        def start_worker(name: str) -> None:
            groups.start(name, ["sh", str(ENTRYPOINT), "ray-worker", *NODE_OPTIONS, "--num-cpus=1",
                                f"--dashboard-agent-listen-port={free_port()}",
                                f"--temp-dir={ray_temp / name}"],
                         cluster_env | {"RAY_ADDRESS": address})

        groups.wait_started("ray-head")
        start_worker("node-a")
        groups.wait_started("node-a")

        # the API, pointed at PostgreSQL, the MLflow server and the Ray head; key from the env
        service = ServiceProcess(tmp_path / "api", jobs_db, mlflow.url, lease=30)
        service.env = cluster_env | service.env | {
            "RAY_ADDRESS": address, "CERTREPRO_RUNS_DIR": str(shared / "runs"),
            "CERTREPRO_TUNE_DIR": str(shared / "tune"), "CERTREPRO_API_KEY": "cluster-test-key"}
        service.client = Client(service.client.url, api_key="cluster-test-key")
        service.start()
        client = service.client
        ready = wait_for(lambda: (lambda r: r if r["ray"]["nodes"] == 2 else None)(
            client.wait_ready()), 120, "node A to join")
        assert ready["store"]["dialect"] == "postgresql"
        assert ready["mlflow_tracking_uri"] == mlflow.url and ready["ray"]["resources"]["CPU"] == 1
        assert healthy(f"{client.url}/healthz", f"{client.url}/readyz")

        # a table job; its row runs on node A (the head has no CPU)
        job = client.submit({"kind": "table", "spec": "demo/digits", "rows": ["ibp"],
                             "profile": "quick"})

        def epoch() -> int:
            return client.job(job["id"])["rows"][0]["progress"]["epoch"]

        wait_for(lambda: epoch() >= 2, 240, "the row to checkpoint epoch 2 on node A")
        start_worker("node-b")
        groups.wait_started("node-b")
        wait_for(lambda: client.wait_ready()["ray"]["nodes"] == 3, 120, "node B to join")
        killed_at = epoch()
        groups.kill("node-a")  # the machine is gone: raylet, agents and the row's worker at once
        assert killed_at < 20, "the row ended before node A could be killed"

        job = finished(client, job["id"], timeout=360)
        row = job["rows"][0]
        assert job["status"] == "succeeded", (job, groups.tail("node-b"))
        # Ray re-ran the task on node B: the dispatcher never saw a failure
        assert row["attempts"] == 1 and row["error"] is None
        assert row["progress"] == {"epoch": 20, "epochs": 20}

        nodes = {n["NodeID"]: n for n in ray_nodes(address, cluster_env)}
        finisher = nodes[row["result"]["ray_node_id"]]
        assert finisher["Alive"] and finisher["ObjectStoreSocketName"].startswith(
            str(ray_temp / "node-b"))
        node_a = [n for n in nodes.values()
                  if n["ObjectStoreSocketName"].startswith(str(ray_temp / "node-a"))]
        assert len(node_a) == 1 and not node_a[0]["Alive"]

        # one MLflow run for the row, resumed from the checkpoint rather than trained again
        tracking = MlflowClient(mlflow.url)
        experiment = tracking.get_experiment_by_name("demo/digits")
        runs = tracking.search_runs([experiment.experiment_id],
                                    filter_string=f"tags.`certrepro.row_id` = '{row['id']}'")
        assert [r.info.run_id for r in runs] == [row["mlflow_run_id"]]
        assert runs[0].info.status == "FINISHED"
        steps = [m.step for m in tracking.get_metric_history(row["mlflow_run_id"], "sec_per_epoch")]
        assert sorted(set(steps)) == list(range(1, 21)), steps
        assert steps.count(1) == 1 and len(steps) <= 21, steps  # at most the epoch cut by the kill
        artifacts = {a.path for a in tracking.list_artifacts(row["mlflow_run_id"])}
        assert {"checkpoint.pt", "result.json"} <= artifacts  # proxied to the artifact store
        assert (shared / "runs" / job["id"] / row["id"] / "checkpoint.pt").is_file()
        assert "IBP" in client.table(job["id"], "md")
    finally:
        if service is not None:
            service.stop()
        groups.stop_all()
        if mlflow is not None:
            mlflow.stop()
        shutil.rmtree(ray_temp, ignore_errors=True)
    for name, process in groups.processes.items():
        assert not _group_pids(process.pid), f"{name} left processes behind"

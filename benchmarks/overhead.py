"""What the service costs on top of the work: one row run directly through `workers/runner.py`
and the same row through `POST /jobs` to a finished row, wall time side by side and split into
phases; then the latency of `POST /jobs`, `POST /jobs/{id}/cancel` and `GET /jobs/{id}` under
concurrent clients. Targets (the issue): row overhead under 10 % on a one-minute row, p99 of
`POST /jobs` under 100 ms with 50 clients.

Run from the repository root (see benchmarks/README.md):

    PYTHONPATH=. python benchmarks/overhead.py            # a ~1 minute row, 50 x 20 requests
    PYTHONPATH=. python benchmarks/overhead.py --quick    # a ~15 s row, 50 x 5 requests
    PYTHONPATH=. python benchmarks/overhead.py --json /tmp/overhead.json

Everything lives in one temporary folder (the service's CERTREPRO_HOME, its SQLite job store,
its MLflow server's store and artifacts, Ray's session folder, the direct runs' work folders),
removed at the end. Only 127.0.0.1 is contacted. The service is stopped with SIGTERM at the end
(SIGKILL after a minute); any process it started that is still alive then is ended by its pid.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import httpx

REPO = Path(__file__).resolve().parents[1]
CLK_TCK = os.sysconf("SC_CLK_TCK")
MARKER_ENV = "CERTREPRO_OVERHEAD_RUN"  # set in the service's environment; children inherit it
DIRECT_RUNS: set[subprocess.Popen] = set()  # direct runs in flight (ended on interruption)


def row_config(epochs: int) -> dict[str, Any]:
    """The timed row: IBP on digits (no data file needed), small model. 1 thread of this 2-core
    Xeon: about 0.53 s per epoch and 2.4 s of certification (PGD 50 x 3 on 360 examples)."""
    return {"method": "ibp", "dataset": "digits", "model": "small", "eps": 0.1,
            "eps_train": 0.15, "epochs": epochs, "batch_size": 32, "seed": 0, "device": "cpu",
            "schedule": {"warmup_epochs": 1, "rampup_epochs": 10},
            "attack": {"steps": 50, "restarts": 3}}


# The body of the latency phase's jobs: valid, cheap to validate and to run should the
# dispatcher start some of them before they are cancelled.
TINY_CONFIG = {"method": "ibp", "dataset": "digits-8x8", "model": "mlp2x100", "eps": 0.05,
               "epochs": 1, "batch_size": 64, "train_limit": 64, "test_limit": 16,
               "attack": {"steps": 1, "restarts": 1}}

# Run in a fresh interpreter: `run_row(config, workdir)` with a recorder that only notes when
# each epoch's metrics and the final metrics arrive (the same points the service's MLflow
# recorder reports), so that both paths are split into phases the same way.
DIRECT_CODE = r"""
import json, sys, time
began = time.time()
threads, config, workdir = int(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
import torch
if threads > 0:
    torch.set_num_threads(threads)
from workers.runner import run_row
imported = time.time()

class Clock:
    def __init__(self):
        self.epochs, self.final = [], None
    def log_params(self, params):
        pass
    def log_metrics(self, metrics, step):
        now = time.time()
        if "sec_per_epoch" in metrics:
            self.epochs.append(now)
        else:
            self.final = now
    def log_artifact(self, path):
        pass

clock = Clock()
started = time.time()
result = run_row(config, workdir, clock)
print("@@overhead " + json.dumps({
    "began": began, "imported": imported, "run_started": started, "run_ended": time.time(),
    "epoch_logged": clock.epochs, "final_logged": clock.final, "timing": result["timing"],
    "metrics": result["metrics"], "threads": torch.get_num_threads(),
    "device": result["device"]}), flush=True)
"""


# -- small helpers ------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def parse_time(text: str | None) -> float | None:
    """An ISO time from the job store (UTC; naive on SQLite) as epoch seconds."""
    if not text:
        return None
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def machine_busy() -> float:
    """CPU seconds the whole machine has spent busy (all cores) since boot."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    guest = sum(fields[8:10]) if len(fields) > 9 else 0  # already counted in user/nice
    return (sum(fields) - idle - guest) / CLK_TCK


def proc_table() -> dict[int, dict[str, Any]]:
    """pid -> ppid, start time, CPU seconds (user + system), command line; every process."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if fields[0] in (b"Z", b"X"):
            continue
        table[int(entry)] = {"ppid": int(fields[1]), "start": int(fields[19]),
                             "cpu": (int(fields[11]) + int(fields[12])) / CLK_TCK, "cmd": cmd}
    return table


def descendants(root: int, table: dict[int, dict[str, Any]] | None = None) -> dict[int, dict]:
    """`root` and every process below it (by parent pid)."""
    table = proc_table() if table is None else table
    children: dict[int, list[int]] = {}
    for pid, info in table.items():
        children.setdefault(info["ppid"], []).append(pid)
    found, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in table and pid not in found:
            found[pid] = table[pid]
            todo.extend(children.get(pid, []))
    return found


def marked_processes(marker: str) -> dict[int, int]:
    """pid -> start time of live processes whose environment carries our run marker."""
    needle = f"{MARKER_ENV}={marker}".encode()
    found = {}
    for pid, info in proc_table().items():
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    found[pid] = info["start"]
        except OSError:
            continue
    return found


def still_alive(pid: int, start: int) -> bool:
    info = proc_table().get(pid)
    return info is not None and info["start"] == start


def service_group(pid: int, root: int, cmd: str) -> str:
    if pid == root:
        return "service (API + dispatcher)"
    if "mlflow" in cmd:
        return "MLflow server"
    if cmd.startswith("ray::") and "Agent" not in cmd:
        return "Ray workers (rows)"  # a worker is ray::IDLE between tasks, ray::row-... in one
    return "Ray system (raylet, GCS, agents)"


class CpuMeter:
    """CPU seconds spent during a phase: the whole machine, this benchmark (its threads and the
    children it reaped), each part of the service's process tree, and everything else."""

    def __init__(self, service_pid: int | None = None):
        self.service_pid = service_pid

    def _service(self) -> dict[int, tuple[int, float, str]]:
        if self.service_pid is None:
            return {}
        return {pid: (info["start"], info["cpu"], service_group(pid, self.service_pid,
                                                                 info["cmd"]))
                for pid, info in descendants(self.service_pid).items()}

    def __enter__(self) -> "CpuMeter":
        self.wall0, self.busy0 = time.monotonic(), machine_busy()
        times = os.times()
        self.own0 = times.user + times.system + times.children_user + times.children_system
        self.svc0 = self._service()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.monotonic() - self.wall0
        self.busy = machine_busy() - self.busy0
        times = os.times()
        self.own = times.user + times.system + times.children_user + times.children_system \
            - self.own0
        self.groups: dict[str, float] = {}
        for pid, (start, cpu, group) in self._service().items():
            before = self.svc0.get(pid)
            used = cpu - before[1] if before and before[0] == start else cpu
            self.groups[group] = self.groups.get(group, 0.0) + used
        self.other = max(0.0, self.busy - self.own - sum(self.groups.values()))

    def summary(self) -> dict[str, Any]:
        return {"wall_sec": self.wall, "machine_busy_cores": self.busy / self.wall,
                "benchmark_cores": self.own / self.wall,
                "service_cores": {k: v / self.wall for k, v in sorted(self.groups.items())},
                "other_cores": self.other / self.wall}


# -- the service --------------------------------------------------------------------------------

class Service:
    """`certrepro serve` in a subprocess: a fresh CERTREPRO_HOME, SQLite, its own MLflow server
    child on a free port, a local Ray whose session folder is under the same temp folder."""

    def __init__(self, root: Path, poll_seconds: float | None):
        self.home = root / "home"
        self.home.mkdir(parents=True)
        (root / "ray").mkdir()
        self.port = free_port()
        self.mlflow_port = free_port()
        self.marker = uuid.uuid4().hex
        env = {k: v for k, v in os.environ.items()
               if k not in ("MLFLOW_TRACKING_URI", "CERTREPRO_DB_URL", "CERTREPRO_API_KEY",
                            "CERTREPRO_RUNS_DIR", "CERTREPRO_DATA", "RAY_ADDRESS")}
        env.update({"CERTREPRO_HOME": str(self.home),
                    "CERTREPRO_MLFLOW_PORT": str(self.mlflow_port),
                    "CERTREPRO_DOWNLOAD": "0", "RAY_TMPDIR": str(root / "ray"),
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO),
                                                                env.get("PYTHONPATH")])),
                    "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
                    MARKER_ENV: self.marker})
        if poll_seconds is not None:
            env["CERTREPRO_POLL_SECONDS"] = str(poll_seconds)
        self.poll_seconds = poll_seconds if poll_seconds is not None else \
            float(os.environ.get("CERTREPRO_POLL_SECONDS") or 0.5)
        self.env = env
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = self.home / "service.log"
        self.process: subprocess.Popen | None = None
        self.mlflow_url: str | None = None
        self.start_sec: float | None = None

    def start(self, timeout: float = 180) -> None:
        began = time.monotonic()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "certrepro", "serve", "--port", str(self.port)],
            env=self.env, cwd=self.home, stdin=subprocess.DEVNULL,
            stdout=self.log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
        with httpx.Client(base_url=self.url, timeout=5, trust_env=False) as http:
            last = "no answer"
            while time.monotonic() - began < timeout:
                if self.process.poll() is not None:
                    raise RuntimeError(f"the service exited with code {self.process.returncode}"
                                       f"; its log:\n{self.log_tail()}")
                try:
                    response = http.get("/readyz")
                    if response.status_code == 200:
                        self.mlflow_url = response.json()["mlflow_tracking_uri"]
                        self.start_sec = time.monotonic() - began
                        return
                    last = response.text
                except httpx.HTTPError as error:
                    last = str(error)
                time.sleep(0.25)
        raise RuntimeError(f"the service was not ready after {timeout:.0f} s ({last}); "
                           f"its log:\n{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 60) -> dict[str, Any]:
        """SIGTERM and wait (SIGKILL after `timeout`); then end, by pid, whatever it started
        that is still alive. Returns what happened."""
        report: dict[str, Any] = {"exit_code": None, "killed": False, "leftovers_ended": []}
        if self.process is None:
            return report
        tree = {pid: info["start"] for pid, info in descendants(self.process.pid).items()}
        tree.update(marked_processes(self.marker))
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                report["killed"] = True
        report["exit_code"] = self.process.returncode
        tree.update(marked_processes(self.marker))  # anything started late, still alive
        deadline = time.monotonic() + 10
        left = {p: s for p, s in tree.items() if still_alive(p, s)}
        while left and time.monotonic() < deadline:
            time.sleep(0.25)
            left = {p: s for p, s in left.items() if still_alive(p, s)}
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid, start in left.items():
                if still_alive(pid, start):
                    report["leftovers_ended"].append(pid)
                    try:
                        os.kill(pid, sig)
                    except (ProcessLookupError, PermissionError):
                        pass
            time.sleep(2)
            left = {p: s for p, s in left.items() if still_alive(p, s)}
        report["leftovers_ended"] = sorted(set(report["leftovers_ended"]))
        report["still_alive"] = sorted(left)
        return report


def quiesce(service: Service, timeout: float, limit: float = 0.25) -> float:
    """Wait until the service's process tree uses under `limit` cores over a second (or
    `timeout` passed); returns the last figure."""
    deadline = time.monotonic() + timeout
    while True:
        with CpuMeter(service.process.pid) as meter:
            time.sleep(1.0)
        used = sum(meter.groups.values()) / meter.wall
        if used < limit or time.monotonic() >= deadline:
            return used


def wait_quiet(service: Service | None, timeout: float, limit: float = 0.3) -> float:
    """Wait until work that is neither this benchmark nor its service uses under `limit` cores
    over 2 s (or `timeout` passed: then say so); returns the last figure."""
    deadline = time.monotonic() + timeout
    waited = False
    while True:
        with CpuMeter(service.process.pid if service else None) as meter:
            time.sleep(2.0)
        other = meter.other / meter.wall
        if other < limit:
            return other
        if time.monotonic() >= deadline:
            print(f"  (other work still uses {other:.2f} cores after waiting {timeout:.0f} s; "
                  f"going on)", flush=True)
            return other
        if not waited:
            print(f"  (other work uses {other:.2f} cores; waiting up to {timeout:.0f} s for "
                  f"it to drop under {limit:g})", flush=True)
            waited = True


# -- part 1: one row, directly and through the service ----------------------------------------

def run_direct(config: dict[str, Any], threads: int, workdir: Path) -> dict[str, Any]:
    """`run_row` in a fresh interpreter; wall time from spawn to exit."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["CERTREPRO_DOWNLOAD"] = "0"
    spawned = time.time()
    process = subprocess.Popen([sys.executable, "-c", DIRECT_CODE, str(threads),
                                json.dumps(config), str(workdir)], cwd=REPO, env=env,
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    DIRECT_RUNS.add(process)
    try:
        stdout, stderr = process.communicate()
    finally:
        DIRECT_RUNS.discard(process)
        if process.poll() is None:
            process.kill()
            process.wait()
    ended = time.time()
    if process.returncode != 0:
        raise RuntimeError(f"the direct run failed (exit {process.returncode}):\n"
                           f"{stderr[-3000:]}")
    line = next(l for l in stdout.splitlines() if l.startswith("@@overhead "))
    inner = json.loads(line.split(" ", 1)[1])
    epoch_logged = inner["epoch_logged"]
    train_start = epoch_logged[0] - inner["timing"]["sec_per_epoch"][0]
    marks = {"start": spawned, "imported": inner["imported"], "train_start": train_start,
             "train_end": epoch_logged[-1], "certify_end": inner["final_logged"], "end": ended}
    return {"wall_sec": ended - spawned, "marks": marks, "timing": inner["timing"],
            "metrics": inner["metrics"], "threads": inner["threads"], "device": inner["device"],
            "phases": direct_phases(marks)}


def direct_phases(m: dict[str, float]) -> dict[str, float]:
    return {"start": m["train_start"] - m["start"],
            "start.interpreter_imports": m["imported"] - m["start"],
            "start.data_model": m["train_start"] - m["imported"],
            "train": m["train_end"] - m["train_start"],
            "certify": m["certify_end"] - m["train_end"],
            "finish": m["end"] - m["certify_end"],
            "total": m["end"] - m["start"]}


def mlflow_history(http: httpx.Client, run_id: str, key: str) -> list[dict[str, Any]]:
    response = http.get("/api/2.0/mlflow/metrics/get-history",
                        params={"run_id": run_id, "metric_key": key, "max_results": 25000})
    response.raise_for_status()
    return sorted(response.json().get("metrics", []), key=lambda m: (m["step"], m["timestamp"]))


def first_post(service: Service, config: dict[str, Any]) -> float:
    """The first POST /jobs after the start, timed apart and not counted: the timed row's config
    cut to 1 epoch, cancelled at once. It is slow once per service process and model family:
    validating a config builds its model, and the first conv model makes torch import sympy
    (about 0.8 s here)."""
    with httpx.Client(base_url=service.url, timeout=120, trust_env=False) as http:
        began = time.perf_counter()
        response = http.post("/jobs", json={"kind": "run", "config": {**config, "epochs": 1}})
        took = time.perf_counter() - began
        if response.status_code != 202:
            raise RuntimeError(f"POST /jobs answered {response.status_code}: {response.text}")
        http.post(f"/jobs/{response.json()['id']}/cancel")
    return took


def run_through_service(service: Service, config: dict[str, Any], poll: float = 0.2,
                        timeout: float = 3600) -> dict[str, Any]:
    """POST the row, poll GET /jobs/{id} every `poll` s until it shows succeeded."""
    seen: dict[str, float] = {}
    with httpx.Client(base_url=service.url, timeout=60, trust_env=False) as http:
        posted = time.time()
        response = http.post("/jobs", json={"kind": "run", "config": config})
        answered = time.time()
        if response.status_code != 202:
            raise RuntimeError(f"POST /jobs answered {response.status_code}: {response.text}")
        job_id = response.json()["id"]
        polls = 0
        while True:
            job = http.get(f"/jobs/{job_id}").json()
            now = time.time()
            polls += 1
            row = job["rows"][0]
            if row["status"] == "running":
                seen.setdefault("running", now)
            if row["progress"]["epoch"] >= 1:
                seen.setdefault("first_epoch", now)
            if row["status"] == "succeeded":
                seen["succeeded"] = now
                break
            if row["status"] in ("failed", "cancelled"):
                raise RuntimeError(f"the row ended {row['status']}: {row.get('error')}\n"
                                   f"{service.log_tail()}")
            if now - posted > timeout:
                raise RuntimeError(f"the row did not finish within {timeout:.0f} s")
            time.sleep(poll)
    result = row["result"]
    attempt = row["attempt_log"][0]
    with httpx.Client(base_url=service.mlflow_url, timeout=60, trust_env=False) as mlflow:
        epochs = mlflow_history(mlflow, row["mlflow_run_id"], "sec_per_epoch")
        final = mlflow_history(mlflow, row["mlflow_run_id"], "clean_acc")
        run = mlflow.get("/api/2.0/mlflow/runs/get",
                         params={"run_id": row["mlflow_run_id"]}).json()["run"]["info"]
    train_start = epochs[0]["timestamp"] / 1000 - result["timing"]["sec_per_epoch"][0]
    marks = {"start": posted, "post_answered": answered,
             "claimed": parse_time(attempt["started_at"]),
             "mlflow_run_created": int(run["start_time"]) / 1000, "train_start": train_start,
             "train_end": epochs[-1]["timestamp"] / 1000,
             "certify_end": final[-1]["timestamp"] / 1000,
             "completed": parse_time(attempt["ended_at"]), "end": seen["succeeded"],
             "first_seen_running": seen.get("running"),
             "first_seen_epoch": seen.get("first_epoch")}
    return {"job_id": job_id, "wall_sec": seen["succeeded"] - posted, "marks": marks,
            "timing": result["timing"], "metrics": result["metrics"],
            "device": result.get("device"), "polls": polls, "phases": service_phases(marks)}


def service_phases(m: dict[str, float]) -> dict[str, float]:
    return {"start": m["train_start"] - m["start"],
            "start.queued": m["claimed"] - m["start"],
            "start.mlflow_runs": m["mlflow_run_created"] - m["claimed"],
            "start.ray_worker_data_model": m["train_start"] - m["mlflow_run_created"],
            "train": m["train_end"] - m["train_start"],
            "certify": m["certify_end"] - m["train_end"],
            "finish": m["end"] - m["certify_end"],
            "finish.artifacts_result_collect": m["completed"] - m["certify_end"],
            "finish.client_poll": m["end"] - m["completed"],
            "total": m["end"] - m["start"]}


# -- part 2: latency under concurrent clients ---------------------------------------------------

def hammer(url: str, clients: int, per_client: int,
           request: Callable[[httpx.Client, int, int], httpx.Response],
           expect: int) -> dict[str, Any]:
    """`clients` threads, each with its own keep-alive httpx.Client: one untimed warm-up
    request, then (all together) `per_client` timed requests back to back."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    answers: list[list[Any]] = [[] for _ in range(clients)]
    failures: list[str] = []
    barrier = threading.Barrier(clients + 1)

    def client(i: int) -> None:
        with httpx.Client(base_url=url, timeout=120, trust_env=False) as http:
            try:
                warm = request(http, i, -1)
                if warm.status_code == expect:
                    answers[i].append(warm.json())
            except httpx.HTTPError as error:
                failures.append(f"warm-up: {error}")
            barrier.wait()
            for k in range(per_client):
                began = time.perf_counter()
                try:
                    response = request(http, i, k)
                except httpx.HTTPError as error:
                    latencies[i].append(time.perf_counter() - began)
                    failures.append(str(error))
                    continue
                latencies[i].append(time.perf_counter() - began)
                if response.status_code != expect:
                    failures.append(f"{response.status_code}: {response.text[:200]}")
                else:
                    answers[i].append(response.json())

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    flat = [x * 1000 for per in latencies for x in per]
    return {"clients": clients, "requests": len(flat), "errors": len(failures),
            "first_errors": failures[:3], "wall_sec": wall,
            "throughput_rps": len(flat) / wall if wall else float("nan"),
            "p50_ms": percentile(flat, 50), "p90_ms": percentile(flat, 90),
            "p99_ms": percentile(flat, 99), "max_ms": max(flat),
            "mean_ms": statistics.fmean(flat), "answers": [a for per in answers for a in per]}


def latency_phase(service: Service, clients: int, per_client: int, sequential: int,
                  finished_job: str | None, settle: float) -> dict[str, Any]:
    body = {"kind": "run", "config": TINY_CONFIG}
    out: dict[str, Any] = {}
    job_ids: list[str] = []

    def post(http: httpx.Client, i: int, k: int) -> httpx.Response:
        return http.post("/jobs", json=body)

    def run(name: str, clients_: int, per: int, request, expect: int,
            settle_first: bool = True) -> list[Any]:
        if settle_first:
            quiesce(service, settle)
        with CpuMeter(service.process.pid) as meter:
            figures = hammer(service.url, clients_, per, request, expect)
        answers = figures.pop("answers")
        figures["cpu"] = meter.summary()
        out[name] = figures
        print(f"  {name:54} p50 {figures['p50_ms']:7.1f} ms  p99 {figures['p99_ms']:7.1f} ms"
              f"  {figures['throughput_rps']:6.1f} req/s  ({figures['requests']} requests, "
              f"{figures['errors']} errors)", flush=True)
        return answers

    def cancel_all(ids: list[str]) -> None:
        with httpx.Client(base_url=service.url, timeout=120, trust_env=False) as http:
            for jid in ids:
                http.post(f"/jobs/{jid}/cancel")

    def healthz(http: httpx.Client, i: int, k: int) -> httpx.Response:
        return http.get("/healthz")

    # the HTTP stack alone (a no-op endpoint): the floor under every figure below
    run("GET /healthz, 1 client", 1, sequential, healthz, 200)
    run(f"GET /healthz, {clients} clients", clients, per_client, healthz, 200)
    # one client, back to back: the service time of one request, with no queueing
    first = [a["id"] for a in run("POST /jobs, 1 client", 1, sequential, post, 202)]
    cancel_all(first)  # at once, so that the dispatcher does not spend the next minutes on them
    job_ids.extend(first)
    # then the 50 clients, and at once (no settling) the cancellation of what they made
    made = [a["id"] for a in run(f"POST /jobs, {clients} clients", clients, per_client, post,
                                 202)]
    job_ids.extend(made)
    chunks = [made[i::clients] for i in range(clients)]

    def cancel(http: httpx.Client, i: int, k: int) -> httpx.Response:
        # k = -1 is the warm-up: each client's first job
        return http.post(f"/jobs/{chunks[i][k + 1]}/cancel")

    per_cancel = min(len(c) for c in chunks) - 1
    run(f"POST /jobs/{{id}}/cancel, {clients} clients", clients, per_cancel, cancel, 200,
        settle_first=False)
    cancel_all([jid for c in chunks for jid in c[per_cancel + 1:]])

    # GET answers carry MLflow links: the API asks MLflow about the job's run and each row's
    # run. Jobs the dispatcher never started have none, so they are timed apart.
    plain, linked, statuses = classify_jobs(service, set(job_ids))
    if finished_job:
        linked.insert(0, finished_job)
    for what, ids in (("no MLflow run", plain), ("MLflow job+row runs", linked)):
        if not ids:
            continue

        def get_job(http: httpx.Client, i: int, k: int, ids=ids) -> httpx.Response:
            return http.get(f"/jobs/{ids[(i * 7919 + k + 1) % len(ids)]}")

        run(f"GET /jobs/{{id}} ({what}), 1 client", 1, sequential, get_job, 200)
        run(f"GET /jobs/{{id}} ({what}), {clients} clients", clients, per_client, get_job, 200)

    out["latency_jobs"] = {"created": len(job_ids), "rows": statuses,
                           "with_mlflow_runs": len(linked), "without": len(plain)}
    return out


def classify_jobs(service: Service,
                  wanted: set[str]) -> tuple[list[str], list[str], dict[str, int]]:
    """(jobs without an MLflow run, jobs with one, their rows' statuses) among `wanted`, via
    GET /jobs pages: what the dispatcher did with them before they were cancelled."""
    plain, linked, cursor = [], [], None
    statuses: dict[str, int] = {}
    with httpx.Client(base_url=service.url, timeout=120, trust_env=False) as http:
        while True:
            params = {"limit": 100, **({"cursor": cursor} if cursor else {})}
            page = http.get("/jobs", params=params).json()
            for job in page["jobs"]:
                if job["id"] in wanted:
                    has_run = job["mlflow_run_id"] or any(r["mlflow_run_id"] for r in job["rows"])
                    (linked if has_run else plain).append(job["id"])
                    for row in job["rows"]:
                        began = "started" if row["attempts"] else "never started"
                        key = f"{row['status']} ({began})"
                        statuses[key] = statuses.get(key, 0) + 1
            cursor = page.get("next_cursor")
            if not cursor:
                return sorted(plain), sorted(linked), statuses


# -- output ---------------------------------------------------------------------------------------

PHASE_LABELS = [
    ("start", "start -> training begins"),
    ("start.interpreter_imports", "  interpreter + imports (direct)"),
    ("start.data_model", "  data, model, checkpoint check (direct)"),
    ("start.queued", "  POST, queued until the dispatcher claims it"),
    ("start.mlflow_runs", "  MLflow job + row runs created"),
    ("start.ray_worker_data_model", "  Ray task, worker imports, data, model"),
    ("train", "training (all epochs)"),
    ("certify", "certification"),
    ("finish", "certification done -> seen finished"),
    ("finish.artifacts_result_collect", "  artifacts, Ray result, dispatcher commit"),
    ("finish.client_poll", "  until the client's next GET"),
    ("total", "TOTAL (wall)"),
]


def compute_sec(run: dict[str, Any]) -> float:
    """Seconds of pure compute: the epochs' own times (no callbacks, no checkpoints) and the
    certifiers'."""
    timing = run["timing"]
    return sum(timing["sec_per_epoch"]) + sum(timing["certify_sec"].values())


def median_phases(runs: list[dict[str, Any]]) -> dict[str, float]:
    keys = runs[0]["phases"].keys()
    return {k: statistics.median(r["phases"][k] for r in runs) for k in keys}


def print_row_table(direct: dict[str, list], service_runs: list[dict], fair: str) -> None:
    columns = [(f"direct {name}", median_phases(runs)) for name, runs in direct.items()]
    columns.append(("service", median_phases(service_runs)))
    base = median_phases(direct[fair])
    svc = columns[-1][1]
    header = f"{'phase (seconds, median)':44}" + "".join(f"{name:>14}" for name, _ in columns) \
        + f"{'service-' + fair:>16}"
    print(header)
    print("-" * len(header))
    for key, label in PHASE_LABELS:
        cells = "".join(f"{col[key]:14.2f}" if key in col else f"{'':14}" for _, col in columns)
        diff = f"{svc[key] - base[key]:+16.2f}" if key in svc and key in base else ""
        print(f"{label:44}{cells}{diff}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs of the timed row (default 100: about 60 s direct on one "
                             "thread here; --quick: 16)")
    parser.add_argument("--quick", action="store_true",
                        help="a ~15 s row and 5 requests per client")
    parser.add_argument("--repeats", type=int, default=1, help="row runs per path (median)")
    parser.add_argument("--direct-threads", default="1,all",
                        help="torch threads of the direct runs, comma-separated; 'all' = torch's "
                             "default. The service gives a row 1 (Ray: 1 CPU per row), so the "
                             "overhead is computed against 1 (default: 1,all)")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--requests", type=int, default=None,
                        help="timed requests per client (default 20; --quick: 5)")
    parser.add_argument("--sequential", type=int, default=50,
                        help="requests of the 1-client baselines")
    parser.add_argument("--poll-seconds", type=float, default=None,
                        help="CERTREPRO_POLL_SECONDS of the service (default: its own, 0.5)")
    parser.add_argument("--settle", type=float, default=30.0,
                        help="before each timed part, wait (at most this many seconds) until "
                             "the service's processes use under 0.25 cores: Ray prestarts and "
                             "restarts workers, MLflow finishes a job's runs")
    parser.add_argument("--quiet-wait", type=float, default=60.0,
                        help="before each row run and the latency part, wait (at most this many "
                             "seconds) until other work on the machine uses under 0.3 cores")
    parser.add_argument("--paired", action="store_true",
                        help="run the direct 1-thread row at the same time as the service row "
                             "(both see the same outside load: for a shared, busy machine)")
    parser.add_argument("--skip-row", action="store_true", help="latency part only")
    parser.add_argument("--skip-latency", action="store_true", help="row part only")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temp folder (logs, job store, MLflow store)")
    parser.add_argument("--json", help="write every figure here")
    args = parser.parse_args(argv)
    epochs = args.epochs or (16 if args.quick else 100)
    per_client = args.requests or (5 if args.quick else 20)
    thread_names = [t.strip() for t in args.direct_threads.split(",") if t.strip()]
    if "1" not in thread_names:
        thread_names.insert(0, "1")
    config = row_config(epochs)

    # SIGTERM/SIGHUP to the benchmark: clean up as for Ctrl-C
    def interrupted(signum, frame):
        raise KeyboardInterrupt
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupted)

    import torch  # only for the device line (and run in the subprocesses anyway)
    began = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="certrepro-overhead-"))
    report: dict[str, Any] = {
        "device": {"cpu_count": os.cpu_count(), "cpu": platform.processor() or _cpu_name(),
                   "torch": torch.__version__, "torch_default_threads": torch.get_num_threads(),
                   "python": platform.python_version(),
                   "loadavg_at_start": os.getloadavg()},
        "row_config": config, "repeats": args.repeats,
        "mode": "paired" if args.paired else "sequential"}
    print(f"device: {report['device']['cpu']}, {os.cpu_count()} CPUs, torch "
          f"{torch.__version__} ({torch.get_num_threads()} threads by default); load average "
          f"{os.getloadavg()[0]:.2f} at start", flush=True)
    print(f"row: ibp digits small, {epochs} epochs, batch 32, PGD 50x3; temp folder {root}",
          flush=True)
    service: Service | None = None
    try:
        direct: dict[str, list[dict]] = {}
        if not args.skip_row:
            for repeat in range(args.repeats):
                for name in thread_names:
                    if args.paired and name == "1":
                        continue  # runs beside the service row
                    threads = 0 if name == "all" else int(name)
                    wait_quiet(None, args.quiet_wait)
                    with CpuMeter() as meter:
                        run = run_direct(config, threads, root / f"direct-{name}-{repeat}")
                    run["cpu"] = meter.summary()
                    label = f"{run['threads']} thr" if name != "all" else \
                        f"all={run['threads']}"
                    direct.setdefault(label, []).append(run)
                    print(f"direct run_row, {label}: {run['wall_sec']:.1f} s (train "
                          f"{run['timing']['train_sec']:.1f} s); other load "
                          f"{meter.summary()['other_cores']:.2f} cores", flush=True)
        service = Service(root, args.poll_seconds)
        service.start()
        print(f"service ready in {service.start_sec:.1f} s (not counted); dispatcher poll "
              f"{service.poll_seconds:g} s; MLflow at {service.mlflow_url}", flush=True)
        quiesce(service, args.settle)
        report["first_post_sec"] = first_post(service, config)
        print(f"first POST /jobs after the start (the row's model): "
              f"{1000 * report['first_post_sec']:.0f} ms (once per service process; not "
              f"counted)", flush=True)
        report["service_start_sec"] = service.start_sec
        report["dispatcher_poll_sec"] = service.poll_seconds
        service_runs: list[dict] = []
        if not args.skip_row:
            for repeat in range(args.repeats):
                quiesce(service, args.settle)
                wait_quiet(service, args.quiet_wait)
                pair: dict[str, Any] = {}
                if args.paired:  # the direct 1-thread row at the same moment, in a thread
                    def beside(repeat=repeat) -> None:
                        try:
                            pair["run"] = run_direct(config, 1, root / f"direct-1-{repeat}")
                        except BaseException as error:  # reported below
                            pair["error"] = error
                    companion = threading.Thread(target=beside, daemon=True)
                with CpuMeter(service.process.pid) as meter:
                    if args.paired:
                        companion.start()
                    run = run_through_service(service, config)
                    if args.paired:
                        companion.join()
                run["cpu"] = meter.summary()
                service_runs.append(run)
                if args.paired:
                    if "error" in pair:
                        raise pair["error"]
                    pair["run"]["cpu"] = run["cpu"]
                    direct.setdefault("1 thr", []).append(pair["run"])
                    print(f"direct run_row, 1 thr (at the same time): "
                          f"{pair['run']['wall_sec']:.1f} s (train "
                          f"{pair['run']['timing']['train_sec']:.1f} s)", flush=True)
                print(f"service POST -> succeeded: {run['wall_sec']:.1f} s (train "
                      f"{run['timing']['train_sec']:.1f} s); other load "
                      f"{run['cpu']['other_cores']:.2f} cores", flush=True)
            fair = next(k for k in direct if k == "1 thr")
            base, svc = median_phases(direct[fair]), median_phases(service_runs)
            report["row"] = {
                "direct": direct, "service": service_runs, "baseline": fair,
                "direct_total_sec": base["total"], "service_total_sec": svc["total"],
                "overhead_sec": svc["total"] - base["total"],
                "overhead_pct": 100 * (svc["total"] - base["total"]) / base["total"],
                "train_overhead_ms_per_epoch": 1000 * (svc["train"] - base["train"]) / epochs}
            # The same run_row code on the same number of threads computes in both paths, so a
            # difference in pure compute (the epochs' own seconds, certification) comes from
            # contention or machine noise; what is left is the service's machinery.
            compute = {name: statistics.median(compute_sec(r) for r in runs)
                       for name, runs in (("direct", direct[fair]), ("service", service_runs))}
            machinery = (svc["total"] - compute["service"]) - (base["total"] - compute["direct"])
            report["row"].update({
                "compute_sec": compute,
                "compute_slowdown_sec": compute["service"] - compute["direct"],
                "machinery_overhead_sec": machinery,
                "machinery_overhead_pct": 100 * machinery / base["total"]})
        if not args.skip_latency:
            print(f"latency: {args.clients} clients x {per_client} requests (+1 warm-up each), "
                  f"1-client baselines of {args.sequential}", flush=True)
            finished = service_runs[0]["job_id"] if service_runs else None
            wait_quiet(service, args.quiet_wait)
            report["latency"] = latency_phase(service, args.clients, per_client,
                                              args.sequential, finished, args.settle)
    finally:
        for process in list(DIRECT_RUNS):  # a paired direct run still going (interrupted)
            process.kill()
            process.wait()
        if service is not None:
            report["service_stop"] = service.stop()
            if report["service_stop"]["leftovers_ended"] or report["service_stop"]["still_alive"]:
                print(f"service stop: {report['service_stop']}", flush=True)
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    report["total_runtime_sec"] = time.monotonic() - began
    report["device"]["loadavg_at_end"] = os.getloadavg()
    print_report(report, args.clients)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
        print(f"figures written to {args.json}")
    return 0


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def print_report(report: dict[str, Any], clients: int) -> None:
    d = report["device"]
    print(f"\n== certrepro service overhead ==  {d['cpu']}, {d['cpu_count']} CPUs, torch "
          f"{d['torch']}; load average {d['loadavg_at_start'][0]:.2f} at start, "
          f"{d['loadavg_at_end'][0]:.2f} at end")
    row = report.get("row")
    if row:
        epochs = len(row["direct"][row["baseline"]][0]["timing"]["sec_per_epoch"])
        mode = ("paired: the direct 1-thread row ran at the same time as the service row"
                if report["mode"] == "paired" else "sequential: one run at a time")
        print(f"\n-- one row ({epochs} epochs; {mode}): direct = run_row in a fresh interpreter; "
              f"service = POST /jobs until GET shows it succeeded (dispatcher poll "
              f"{report['dispatcher_poll_sec']:g} s, client poll 0.2 s); the service runs a "
              f"row on 1 torch thread\n")
        print_row_table(row["direct"], row["service"], row["baseline"])
        verdict = "OK" if row["overhead_pct"] < 10 else "OVER the 10 % target"
        posts = [r["marks"]["post_answered"] - r["marks"]["start"] for r in row["service"]]
        claims = [r["phases"]["start.queued"] for r in row["service"]]
        print(f"(the row's POST /jobs took {1000 * statistics.median(posts):.0f} ms; the "
              f"dispatcher claimed the row {statistics.median(claims):.2f} s after it was sent)")
        print(f"\noverhead vs direct ({row['baseline']}): {row['overhead_sec']:+.2f} s = "
              f"{row['overhead_pct']:+.1f} %  [{verdict}]; training "
              f"{row['train_overhead_ms_per_epoch']:+.1f} ms per epoch")
        print(f"  of which pure compute (epochs' own seconds + certifiers), service minus "
              f"direct: {row['compute_slowdown_sec']:+.2f} s (the same code on the same "
              f"threads: contention or machine noise);\n  the rest, the service's machinery: "
              f"{row['machinery_overhead_sec']:+.2f} s = {row['machinery_overhead_pct']:+.1f} % "
              f"[{'OK' if row['machinery_overhead_pct'] < 10 else 'OVER'}]")
        paired = report["mode"] == "paired"
        for label, runs in [*((f"direct {k}", v) for k, v in row["direct"].items()
                              if not (paired and k == row["baseline"])),
                            ("service" + (" and direct 1 thr" if paired else ""),
                             row["service"])]:
            cpu = runs[0]["cpu"]
            parts = ", ".join(f"{k} {v:.2f}" for k, v in cpu["service_cores"].items())
            print(f"  CPU during {label}: machine {cpu['machine_busy_cores']:.2f} cores busy; "
                  f"benchmark {cpu['benchmark_cores']:.2f}"
                  + (f"; {parts}" if parts else "") + f"; other work {cpu['other_cores']:.2f}")
        others = [r["cpu"]["other_cores"] for runs in row["direct"].values() for r in runs] + \
            [r["cpu"]["other_cores"] for r in row["service"]]
        if max(others) > 0.3:
            advice = "compare the machinery figure" if paired else \
                "rerun on a quiet machine, or with --paired and compare the machinery figure"
            print(f"WARNING: other work used up to {max(others):.2f} cores during the row runs;"
                  f" the totals are noisy ({advice})")
    latency = report.get("latency")
    if latency:
        print(f"\n-- request latency (ms; each client its own keep-alive connection; the load "
              f"generator runs on the same machine)\n")
        header = (f"{'request':54}{'n':>6}{'p50':>8}{'p90':>8}{'p99':>8}{'max':>8}"
                  f"{'req/s':>8}{'err':>4}  cores: API MLflow RayW RayS bench other")
        print(header)
        print("-" * len(header))
        for name, f in latency.items():
            if name == "latency_jobs":
                continue
            cpu = f["cpu"]
            svc = cpu["service_cores"]
            workers = sum(v for k, v in svc.items() if k.startswith("Ray workers"))
            system = sum(v for k, v in svc.items() if k.startswith("Ray system"))
            print(f"{name:54}{f['requests']:6d}{f['p50_ms']:8.1f}{f['p90_ms']:8.1f}"
                  f"{f['p99_ms']:8.1f}{f['max_ms']:8.1f}{f['throughput_rps']:8.1f}"
                  f"{f['errors']:4d}  {svc.get('service (API + dispatcher)', 0):10.2f}"
                  f"{svc.get('MLflow server', 0):7.2f}{workers:5.2f}{system:5.2f}"
                  f"{cpu['benchmark_cores']:6.2f}{cpu['other_cores']:6.2f}")
        key = f"POST /jobs, {clients} clients"
        if key in latency:
            many, one = latency[key], latency["POST /jobs, 1 client"]
            p99 = many["p99_ms"]
            print(f"\nPOST /jobs p99 with {clients} clients: {p99:.1f} ms  "
                  f"[{'OK' if p99 < 100 else 'OVER the 100 ms target'}]")
            print(f"  one client: {one['p50_ms']:.1f} ms per POST; {clients} clients: "
                  f"{many['throughput_rps']:.0f} req/s, so by Little's law {clients} requests in "
                  f"flight wait {1000 * clients / many['throughput_rps']:.0f} ms on average "
                  f"(= {clients * 1000 / many['throughput_rps'] / one['p50_ms']:.0f} x the "
                  f"one-client time: they are served about one at a time)")
        jobs = latency["latency_jobs"]
        print(f"latency jobs: {jobs['created']} created, all cancelled at the end of the POST "
              f"part; their rows: {jobs['rows']}")
    stop = report.get("service_stop") or {}
    print(f"\nservice stopped (exit code {stop.get('exit_code')}"
          f"{', killed' if stop.get('killed') else ''}); processes left over and ended: "
          f"{len(stop.get('leftovers_ended', []))}; total runtime "
          f"{report['total_runtime_sec']:.0f} s")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # the service is stopped and the temp folder removed by then
        print("\ninterrupted; the service was stopped and the temp folder removed",
              file=sys.stderr)
        sys.exit(130)

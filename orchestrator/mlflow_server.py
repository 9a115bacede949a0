"""The embedded MLflow tracking server: an `mlflow server` child process on SQLite.

The embedded default (DESIGN.md "Conventions") needs nothing but Python, yet Ray workers must be
able to log to MLflow from any machine, artifacts included. So instead of pointing clients at a
`sqlite:///` URI directly, the service starts `mlflow server` with a SQLite backend and proxied
artifacts (`--serve-artifacts`): every client, local or remote, talks HTTP to one process, and
artifacts land under `home/mlartifacts` through `mlflow-artifacts:/` URIs.

    with MLflowServer(settings.home) as server:
        tracker = MLflowTracker(server.url)

One uvicorn worker only: SQLite wants a single writer. The server runs in its own process group
(so a Ctrl-C meant for the service does not kill it half-way, and `stop()` can take down the whole
tree: the `mlflow` CLI process and the uvicorn process it spawns). Its output goes to
`home/mlflow-server.log`.
"""
from __future__ import annotations

import atexit
import errno
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

LOG_NAME = "mlflow-server.log"
DB_NAME = "mlflow.db"
ARTIFACTS_NAME = "mlartifacts"


class MLflowServerError(RuntimeError):
    """The MLflow server could not be started (the message holds the tail of its log)."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the OS picks it)."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _port_in_use(host: str, port: int) -> OSError | None:
    """Whether uvicorn would fail to bind (host, port): it sets SO_REUSEADDR, so do we (a port in
    TIME_WAIT is free, one with a listener or a plain bound socket is not)."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc
    return None


def _pid_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie (a reaped-late grandchild counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        return state not in (b"Z", b"X")
    except FileNotFoundError:
        return False
    except OSError:  # no /proc (macOS): fall back to signal 0
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def _group_pids(pgid: int) -> list[int]:
    """Live processes of process group `pgid` (Linux /proc; [] elsewhere)."""
    pids = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return pids
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        # after "pid (comm)": state ppid pgrp ...
        if int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            pids.append(int(entry))
    return pids


class MLflowServer:
    """An `mlflow server` child process: SQLite backend at `home/mlflow.db`, artifacts proxied to
    `home/mlartifacts`, log at `home/mlflow-server.log`. `port=0` picks a free port."""

    def __init__(self, home: str | os.PathLike, port: int = 0, host: str = "127.0.0.1",
                 workers: int = 1, extra_args: list[str] | None = None):
        self.home = Path(home).expanduser().resolve()
        self.host = host
        self.port = int(port)
        self.workers = int(workers)
        self.extra_args = list(extra_args or [])
        self.process: subprocess.Popen | None = None
        self.start_seconds: float | None = None  # how long the last start() took
        self._log_file = None

    # --- paths and addresses -------------------------------------------------------------
    @property
    def backend_store_uri(self) -> str:
        return f"sqlite:///{self.home / DB_NAME}"  # absolute path: sqlite:////abs/mlflow.db

    @property
    def artifacts_destination(self) -> Path:
        return self.home / ARTIFACTS_NAME

    @property
    def log_path(self) -> Path:
        return self.home / LOG_NAME

    @property
    def url(self) -> str:
        """The tracking URI clients use: http://127.0.0.1:PORT (a wildcard bind is reached on
        loopback)."""
        host = self.host
        if host in ("", "0.0.0.0"):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", self.backend_store_uri,
            "--artifacts-destination", str(self.artifacts_destination),
            "--serve-artifacts",
            "--host", self.host,
            "--port", str(self.port),
            "--workers", str(self.workers),
            *self.extra_args,
        ]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        # The server's job runner (huey consumers for GenAI evaluation jobs) costs half a dozen
        # extra processes and a second of startup; certrepro never submits server jobs.
        env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
        env["PYTHONUNBUFFERED"] = "1"
        return env

    # --- lifecycle -----------------------------------------------------------------------
    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = 60.0) -> "MLflowServer":
        if self.is_running():
            return self
        began = time.monotonic()
        self.home.mkdir(parents=True, exist_ok=True)
        self.artifacts_destination.mkdir(parents=True, exist_ok=True)
        if self.port == 0:
            self.port = free_port(self.host)
        else:
            busy = _port_in_use(self.host, self.port)
            if busy is not None:
                why = ("is already in use" if busy.errno == errno.EADDRINUSE
                       else f"cannot be bound ({busy})")
                raise MLflowServerError(
                    f"cannot start the MLflow server: {self.host}:{self.port} {why}; "
                    f"choose another port (CERTREPRO_MLFLOW_PORT, 0 = any free port) or point "
                    f"MLFLOW_TRACKING_URI at the server that is running there")
        command = self.command()
        self._log_file = open(self.log_path, "ab", buffering=0)
        self._log_file.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting: "
                             f"{' '.join(command)}\n".encode())
        self.process = subprocess.Popen(
            command, cwd=self.home, env=self.environment(), stdin=subprocess.DEVNULL,
            stdout=self._log_file, stderr=subprocess.STDOUT, start_new_session=True)
        atexit.register(self.stop)  # never leave an orphan server behind
        health = f"{self.url}/health"
        deadline = began + timeout
        while True:
            code = self.process.poll()
            if code is not None:
                self.stop()
                raise MLflowServerError(
                    f"the MLflow server exited with code {code} before it answered {health}; "
                    f"last lines of {self.log_path}:\n{self.log_tail()}")
            if _health_ok(health):
                if self.process.poll() is None:  # ours, not a stranger that took the port
                    self.start_seconds = time.monotonic() - began
                    return self
                continue
            if time.monotonic() > deadline:
                self.stop()
                raise MLflowServerError(
                    f"the MLflow server did not answer {health} within {timeout:.0f} s; "
                    f"last lines of {self.log_path}:\n{self.log_tail()}")
            time.sleep(0.1)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM to the server's process group, SIGKILL to what is left after `timeout`."""
        process, self.process = self.process, None
        if process is None:
            return
        atexit.unregister(self.stop)
        pgid = process.pid  # start_new_session: the child leads its own group
        if process.poll() is None or _group_pids(pgid):
            _killpg(pgid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if process.poll() is not None and not _group_pids(pgid):
                    break
                time.sleep(0.05)
            else:
                _killpg(pgid, signal.SIGKILL)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL cannot be ignored
                pass
            deadline = time.monotonic() + timeout
            while _group_pids(pgid) and time.monotonic() < deadline:
                _killpg(pgid, signal.SIGKILL)
                time.sleep(0.05)
        self._close_log()

    def pids(self) -> list[int]:
        """Live processes of the server (the mlflow CLI and the uvicorn it spawned)."""
        if self.process is None:
            return []
        return _group_pids(self.process.pid)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> "MLflowServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"MLflowServer({str(self.home)!r}, {self.url}, {state})"


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via HTTP_PROXY


def _health_ok(url: str) -> bool:
    try:
        with _DIRECT.open(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass

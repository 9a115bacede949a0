"""Running rows on Ray: the remote task that wraps `workers.runner.run_row`, and the small
executor the dispatcher uses to submit, poll and cancel them.

Workers are stateless: everything a row needs travels with the task (its resolved config, its
work folder on the shared runs folder, a picklable MLflow recorder), and everything it produces
lands in that folder (checkpoint, progress.json, result.json) and in MLflow.

Two kinds of failure, two kinds of retry. A row whose code raised is the dispatcher's business: it
records the failed attempt and retries up to CERTREPRO_MAX_ATTEMPTS. A row whose node or worker
process died (a lost machine, a killed raylet, the OOM killer) did nothing wrong: Ray re-runs the
same task on a live node up to CERTREPRO_NODE_RETRIES times, and as the work folder is on the
shared runs folder it resumes from the row's last checkpoint into the same MLflow run. Only when
those retries are spent does the dispatcher see the loss, named as such.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray


def execute_row(config: dict[str, Any], workdir: str, recorder: Any | None,
                threads: int) -> dict[str, Any]:
    """Body of the Ray task: train (resuming from the folder's checkpoint) and certify one row.
    Returns the result without its per-example list (that stays in result.json and MLflow)."""
    import torch

    from workers.recorder import FanOut, ProgressFile
    from workers.runner import run_row

    torch.set_num_threads(max(1, threads))  # the CPUs Ray gave this task, not the whole machine
    progress = ProgressFile(Path(workdir) / "progress.json", int(config["epochs"]))
    recorders = (progress,) if recorder is None else (progress, recorder)
    result = run_row(config, workdir, FanOut(*recorders))
    result.pop("per_example", None)
    result["result_path"] = str(Path(workdir) / "result.json")
    # which node finished the row (after a node loss, not the one that started it)
    result["ray_node_id"] = ray.get_runtime_context().get_node_id()
    return result


@contextmanager
def _signal_handlers_kept():
    """ray.init installs its own SIGTERM handler (exit at once); the server that embeds Ray
    (uvicorn) must keep its own, so that SIGTERM shuts the service down cleanly."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


# retry_exceptions=False: Ray re-runs a row only when its node or worker died (max_retries is set
# per submission); an exception the row raised goes to the dispatcher. A cancelled task is never
# retried (ray.cancel).
_remote_row = ray.remote(max_retries=0, retry_exceptions=False)(execute_row)

# What ray.get raises when the row's process or node was lost rather than the row failing.
LOST = (ray.exceptions.NodeDiedError, ray.exceptions.WorkerCrashedError,
        ray.exceptions.ObjectLostError, ray.exceptions.LocalRayletDiedError,
        ray.exceptions.OutOfMemoryError)


@dataclass
class RowHandle:
    row_id: str
    ref: Any  # ray.ObjectRef
    workdir: Path


class RayExecutor:
    """Start (or join) Ray and run rows as tasks with the resources each asks for."""

    def __init__(self, address: str | None, *, cpus_per_row: float = 1.0,
                 gpus_per_row: float | None = None, num_cpus: int | None = None,
                 node_retries: int = 3):
        if not ray.is_initialized():
            with _signal_handlers_kept():
                if address:
                    ray.init(address=address, logging_level="WARNING")
                else:  # the embedded default: a local Ray inside this process
                    ray.init(num_cpus=num_cpus, include_dashboard=False,
                             logging_level="WARNING")
        self.cpus_per_row = cpus_per_row
        self._gpus_per_row = gpus_per_row
        self.node_retries = max(0, int(node_retries))

    @property
    def gpus_per_row(self) -> float:
        """One GPU per row while the cluster has GPUs, else CPU only. Asked of the cluster as it is
        now, not once at start: in a cluster the GPU workers may join after the API."""
        if self._gpus_per_row is not None:
            return self._gpus_per_row
        return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0

    def capacity(self) -> int:
        """How many rows the cluster can run at once (at least one: with no worker node yet, that
        row waits in Ray until one joins)."""
        resources = ray.cluster_resources()
        gpus = self.gpus_per_row
        if gpus > 0:
            return max(1, int(resources.get("GPU", 0) // gpus))
        return max(1, int(resources.get("CPU", 1) // self.cpus_per_row))

    def submit(self, row_id: str, config: dict[str, Any], workdir: Path,
               recorder: Any | None) -> RowHandle:
        config = dict(config)
        gpus = self.gpus_per_row
        if gpus > 0 and config.get("device") == "cpu":
            config["device"] = "cuda"
        options = {"num_cpus": self.cpus_per_row, "num_gpus": gpus,
                   "max_retries": self.node_retries, "name": f"row-{row_id[:8]}"}
        threads = int(self.cpus_per_row) or 1
        ref = _remote_row.options(**options).remote(config, str(workdir), recorder, threads)
        return RowHandle(row_id, ref, workdir)

    @staticmethod
    def done(handles: list[RowHandle]) -> list[RowHandle]:
        if not handles:
            return []
        ready, _ = ray.wait([h.ref for h in handles], num_returns=len(handles), timeout=0)
        ready_set = set(ready)
        return [h for h in handles if h.ref in ready_set]

    def outcome(self, handle: RowHandle) -> tuple[dict[str, Any] | None, str | None]:
        """(result, None) or (None, error message) for a finished task."""
        try:
            return ray.get(handle.ref), None
        except ray.exceptions.RayTaskError as error:
            cause = error.cause if getattr(error, "cause", None) is not None else error
            return None, f"{type(cause).__name__}: {cause}"
        except LOST as error:  # Ray's own retries on other nodes are spent
            return None, (f"the row's Ray worker or node was lost (after {self.node_retries} "
                          f"re-runs): {type(error).__name__}: {error}")
        except ray.exceptions.RayError as error:  # cancelled, unschedulable, ...
            return None, f"{type(error).__name__}: {error}"

    @staticmethod
    def cancel(handle: RowHandle) -> None:
        ray.cancel(handle.ref, force=True)

    @staticmethod
    def ready() -> dict[str, Any]:
        if not ray.is_initialized():
            return {"initialized": False, "resources": {}, "nodes": 0}
        return {"initialized": True, "resources": ray.cluster_resources(),
                "nodes": sum(1 for node in ray.nodes() if node.get("Alive"))}

    @staticmethod
    def shutdown() -> None:
        if ray.is_initialized():
            ray.shutdown()

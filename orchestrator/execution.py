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

A row whose model another row of its job trains (orchestrator.shared_training) runs
`execute_certify` instead: it certifies that row's final checkpoint with its own certification
settings, and its result carries the training's history and seconds per epoch, as if it had
trained. It is retried and re-run on node loss the same way (certification has no state to keep).
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
    from workers.runner import run_row

    result = run_row(config, workdir, _task_recorder(config, workdir, recorder, threads))
    return _as_returned(result, workdir)


def execute_certify(config: dict[str, Any], workdir: str, recorder: Any | None, threads: int,
                    source: dict[str, Any]) -> dict[str, Any]:
    """Body of the Ray task of a row whose model row `source` trained: certify `source`'s final
    checkpoint (`source["checkpoint"]`) under this row's config. The checkpoint must hold the
    finished training of this row's training config; its history and seconds per epoch become
    this row's (in the result and, per epoch, in MLflow), and `trained_by` names `source`."""
    from workers.core.config import resolve
    from workers.core.train import load_checkpoint
    from workers.files import write_json
    from workers.recorder import flatten
    from workers.runner import certify_checkpoint

    from .shared_training import certification_overrides, training_key

    out = _task_recorder(config, workdir, recorder, threads)
    resolved = resolve(config)
    path = source["checkpoint"]
    state = load_checkpoint(path)
    trainer = f"row {source['row']} (id {source['row_id']})"
    if training_key(state.get("config") or {}) != training_key(resolved):
        raise ValueError(f"checkpoint {path} of {trainer} was not trained with this row's "
                         "training config; it cannot stand in for this row's training")
    if state.get("epoch") != resolved.epochs:
        raise ValueError(f"checkpoint {path} of {trainer} holds epoch {state.get('epoch')} of "
                         f"{resolved.epochs}: its training did not finish")
    out.log_params(flatten(resolved.model_dump()))
    for epoch, (means, seconds) in enumerate(zip(state["history"], state["sec_per_epoch"]), 1):
        out.log_metrics({**means, "sec_per_epoch": seconds}, step=epoch)
    result = certify_checkpoint(path, certification_overrides(resolved))
    # the trained model is the trainer's; data, timing and history are its training's
    result["config"] = resolved.model_dump()
    result["history"] = state["history"]
    if source.get("train_size") is not None:
        result["data"] = result["data"] | {"train_size": source["train_size"]}
    result["trained_by"] = {key: source.get(key)
                            for key in ("row_id", "row", "seed", "mlflow_run_id", "checkpoint")}
    out.log_metrics(flatten(result["metrics"]), step=resolved.epochs)
    write_json(Path(workdir) / "result.json", result)
    out.log_artifact(str(Path(workdir) / "result.json"))
    return _as_returned(result, workdir)


def _task_recorder(config: dict[str, Any], workdir: str, recorder: Any | None, threads: int):
    """Use the CPUs Ray gave this task (not the whole machine) and report to the row's progress
    file (and MLflow when there is a recorder)."""
    import torch

    from workers.recorder import FanOut, ProgressFile

    torch.set_num_threads(max(1, threads))
    progress = ProgressFile(Path(workdir) / "progress.json", int(config["epochs"]))
    return FanOut(progress) if recorder is None else FanOut(progress, recorder)


def _as_returned(result: dict[str, Any], workdir: str) -> dict[str, Any]:
    """What the task hands the dispatcher: the result without its per-example list (that stays
    in result.json and MLflow), with where it lies and which node finished the row (after a
    node loss, not the one that started it)."""
    result.pop("per_example", None)
    result["result_path"] = str(Path(workdir) / "result.json")
    # (None when the body runs outside Ray, as the unit tests call it)
    result["ray_node_id"] = (ray.get_runtime_context().get_node_id() if ray.is_initialized()
                             else None)
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
_remote_certify = ray.remote(max_retries=0, retry_exceptions=False)(execute_certify)

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
               recorder: Any | None, source: dict[str, Any] | None = None) -> RowHandle:
        """Run the row: train and certify, or with `source` (the row that trained its model:
        row_id, row, seed, mlflow_run_id, checkpoint, train_size) certify that checkpoint."""
        config = dict(config)
        gpus = self.gpus_per_row
        if gpus > 0 and config.get("device") == "cpu":
            config["device"] = "cuda"
        options = {"num_cpus": self.cpus_per_row, "num_gpus": gpus,
                   "max_retries": self.node_retries, "name": f"row-{row_id[:8]}"}
        threads = int(self.cpus_per_row) or 1
        args = (config, str(workdir), recorder, threads)
        if source is None:
            ref = _remote_row.options(**options).remote(*args)
        else:
            ref = _remote_certify.options(**options).remote(*args, source)
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

"""The dispatcher: the job store is the durable queue, and this loop moves rows through it.

Each tick it (1) stops rows whose job was cancelled, (2) records the rows whose Ray task ended
(success, or a failure that is retried up to the limit, resuming from the row's checkpoint),
(3) renews the leases of the rows it runs and copies their progress (epoch k of n, latest metrics)
into the store, and (4) claims due rows up to the cluster's capacity and submits them. Rows whose
lease expired (their dispatcher died) are due again, so a restarted service picks them up and they
resume from their last checkpoint. Every store write is fenced by this dispatcher's owner id.

A row whose model another row of its job trains (`trained_by`, orchestrator.shared_training) is
only claimed once that row has ended (the store's claim filter; while it waits it stays queued and
its progress names the row it waits for). Then it runs as a certify-only task on that row's final
checkpoint, with its MLflow run tagged with the training row and its run. Should the training row
fail for good, the store fails its waiting rows in the same transaction, naming it: they do not
train themselves, since the same training would most likely fail again.

A sweep job's row runs the same way, as a task that drives Ray Tune (orchestrator.sweeps); its
trials' states come from the sweep's state file each tick, as a row's progress does, and a sweep
that is picked up again restores its Tuner.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from workers.recorder import read_progress

from .execution import RayExecutor, RowHandle
from .settings import Settings
from .shared_training import shared_training_tags
from .store import JobStore, RowView
from .sweep_state import read_state

log = logging.getLogger("certrepro.dispatcher")


class Dispatcher:
    def __init__(self, store: JobStore, executor: RayExecutor, settings: Settings,
                 tracking: Any | None = None):
        self.store, self.executor, self.settings = store, executor, settings
        self.tracking = tracking  # orchestrator.service.Tracking or None (no MLflow)
        self.owner = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.running: dict[str, RowHandle] = {}
        self._reported: dict[str, int] = {}  # row -> last epoch written to the store
        self.sweeps: dict[str, str] = {}  # sweep row -> its job; value: last trial state stored
        self._last_renewal = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the loop ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="dispatcher", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # one bad tick (a store hiccup) must not end the service
                log.exception("dispatcher tick failed")
            self._stop.wait(self.settings.poll_seconds)

    def stop(self, release: bool = True) -> None:
        """Stop the loop; with `release`, cancel the tasks and give their rows back to the queue
        so the next start takes them at once (they resume from their checkpoints)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if release:
            for row_id, handle in list(self.running.items()):
                self.executor.cancel(handle)
                self.store.release(row_id, self.owner)
            self.running.clear()

    def tick(self) -> None:
        self._stop_cancelled()
        self._collect_finished()
        self._report_progress()
        now = time.monotonic()
        if now - self._last_renewal >= min(self.settings.lease_seconds / 3, 5.0):
            self._renew_leases()
            self._last_renewal = now
        self._claim_and_submit()

    # -- the steps ----------------------------------------------------------------------------

    def _stop_cancelled(self) -> None:
        for row_id in self.store.rows_to_stop(self.owner):
            handle = self.running.pop(row_id, None)
            self._reported.pop(row_id, None)
            if handle is not None:
                self.executor.cancel(handle)
            if row_id in self.sweeps:
                self._sync_trials(row_id, handle)
            self.store.finish_cancelled(row_id, self.owner)
            if row_id in self.sweeps:
                self.sweeps.pop(row_id)
                self._cancel_trials(row_id)
            if self.tracking is not None:
                self.tracking.row_ended(row_id, "KILLED")
            self._job_changed_for(row_id)

    def _collect_finished(self) -> None:
        for handle in self.executor.done(list(self.running.values())):
            del self.running[handle.row_id]
            self._reported.pop(handle.row_id, None)
            result, error = self.executor.outcome(handle)
            if handle.row_id in self.sweeps:
                self._sync_trials(handle.row_id, handle, (result or {}).pop("trials", None))
                self.sweeps.pop(handle.row_id)
            if error is None:
                self.store.complete_row(handle.row_id, self.owner, result)
                if self.tracking is not None:
                    self.tracking.row_ended(handle.row_id, "FINISHED")
            else:
                status = self.store.fail_row(handle.row_id, self.owner, error,
                                             max_attempts=self.settings.max_attempts)
                log.warning("row %s failed (%s): %s", handle.row_id, status, error)
                if status == "failed" and self.tracking is not None:
                    self.tracking.row_ended(handle.row_id, "FAILED")
            self._job_changed_for(handle.row_id)

    def _report_progress(self) -> None:
        """Copy each running row's progress file into the store when its epoch moved (every
        tick, so "epoch k of n" is current within a poll interval)."""
        for row_id, handle in list(self.running.items()):
            if row_id in self.sweeps:
                self._sync_trials(row_id, handle)
            progress = read_progress(handle.workdir / "progress.json")
            if not progress or self._reported.get(row_id) == progress["epoch"]:
                continue
            if self.store.record_progress(row_id, self.owner, epoch=int(progress["epoch"]),
                                          epochs=int(progress["epochs"]),
                                          metrics=progress.get("metrics", {})):
                self._reported[row_id] = progress["epoch"]
            else:
                self._let_go(row_id, handle)

    def _renew_leases(self) -> None:
        for row_id, handle in list(self.running.items()):
            if not self.store.renew_lease(row_id, self.owner, self.settings.lease_seconds):
                self._let_go(row_id, handle)

    def _let_go(self, row_id: str, handle: RowHandle) -> None:
        # another dispatcher took the row over (our lease had expired): stop our copy of it
        log.warning("lost the lease of row %s; stopping its task", row_id)
        self.executor.cancel(handle)
        self.running.pop(row_id, None)
        self._reported.pop(row_id, None)
        self.sweeps.pop(row_id, None)

    def _claim_and_submit(self) -> None:
        free = self.executor.capacity() - len(self.running)
        if free <= 0:
            return
        rows = self.store.claim_rows(self.owner, lease_seconds=self.settings.lease_seconds,
                                     limit=free, max_attempts=self.settings.max_attempts)
        for row in rows:
            self._submit(row)

    def _submit(self, row: RowView) -> None:
        workdir = self.settings.runs_dir / row.job_id / row.id
        if self.store.job_kind(row.job_id) == "sweep":
            self._submit_sweep(self.store.get_job(row.job_id), row, workdir)
            return
        source = None
        if row.trained_by is not None:
            source = self._training_source(row)
            if source is None:
                return
        recorder = None
        if self.tracking is not None:
            try:
                recorder = self.tracking.row_recorder(row)
                if source is not None:
                    recorder.set_tags(shared_training_tags(source))
                self.store.record_progress(row.id, self.owner, epoch=row.progress["epoch"],
                                           epochs=int(row.config["epochs"]),
                                           metrics=row.metrics, mlflow_run_id=recorder.run_id)
            except Exception as error:  # MLflow down: the row still runs, without tracking
                log.warning("MLflow unavailable for row %s: %s", row.id, error)
                recorder = None
        self.running[row.id] = self.executor.submit(row.id, row.config, workdir, recorder,
                                                    source)

    def _training_source(self, row: RowView) -> dict | None:
        """The row that trained `row`'s model, as the certify-only task needs it; None (and the
        row failed for good) when it has no checkpoint to give."""
        trainer = self.store.get_row(row.trained_by["row_id"])
        checkpoint = (trainer.result or {}).get("checkpoint")
        if trainer.status == "succeeded" and checkpoint:
            return {"row_id": trainer.id, "row": trainer.name, "seed": trainer.seed,
                    "mlflow_run_id": trainer.mlflow_run_id, "checkpoint": checkpoint,
                    "train_size": ((trainer.result or {}).get("data") or {}).get("train_size")}
        error = (f"not certified: row {trainer.name} (id {trainer.id}), which trains this row's "
                 f"model, is {trainer.status} without a checkpoint in its result")
        self.store.fail_row(row.id, self.owner, error, max_attempts=self.settings.max_attempts,
                            final=True)
        self._job_changed_for(row.id)
        return None

    # -- sweeps -------------------------------------------------------------------------------

    def _submit_sweep(self, job, row: RowView, workdir) -> None:
        from .sweeps import submit_sweep, sweep_context
        ctx = sweep_context(job, row, workdir, self.settings, self.tracking)
        if ctx.parent_run_id:
            self.store.record_progress(row.id, self.owner, epoch=row.progress["epoch"],
                                       epochs=int(ctx.sweep["trials"]), metrics=row.metrics,
                                       mlflow_run_id=ctx.parent_run_id)
        self.sweeps[row.id] = ""
        self.running[row.id] = submit_sweep(ctx, row.id)

    def _sync_trials(self, row_id: str, handle: RowHandle | None,
                     trials: list[dict] | None = None) -> None:
        """The sweep's trials (from its state file, or its final result) into the store when
        they changed since the last copy."""
        if trials is None and handle is not None:
            trials = (read_state(handle.workdir) or {}).get("trials")
        if not trials:
            return
        text = json.dumps(trials, sort_keys=True, default=str)
        if self.sweeps.get(row_id) == text:
            return
        if self.store.record_trials(row_id, self.owner, trials):
            self.sweeps[row_id] = text

    def _cancel_trials(self, row_id: str) -> None:
        """A cancelled sweep: its unfinished trials are cancelled, their MLflow runs KILLED."""
        row = self.store.get_row(row_id)
        for trial in self.store.cancel_trials(row.job_id):
            if self.tracking is not None and trial.get("mlflow_run_id"):
                try:
                    self.tracking.tracker.finish(trial["mlflow_run_id"], "KILLED")
                except Exception as error:
                    log.warning("could not close the MLflow run of trial %s: %s",
                                trial["trial_id"], error)

    def _job_changed_for(self, row_id: str) -> None:
        if self.tracking is not None:
            try:
                self.tracking.job_progress(self.store, row_id)
            except Exception as error:
                log.warning("could not update the MLflow job run for row %s: %s", row_id, error)

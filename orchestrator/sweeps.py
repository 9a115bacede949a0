"""Sweep jobs on Ray Tune.

A sweep job is one row in the store. The dispatcher runs it like a row, as a Ray task, but the
task (`run_sweep`) drives a Ray Tune `Tuner` on the same Ray whose trainable (`run_trial`) is the
row runner itself: a trial is a row (`workers.runner.run_row`) with the sampled values set in the
sweep's base config. Each trial

- reports to Tune after every epoch (the sweep's metric, evaluated on the test subset when it is
  a certified metric, so that ASHA can compare trials between epochs) with its checkpoint, and
  once more after certification (the final metrics);
- logs to its own MLflow run, nested under the job's run and found again by (job, trial) tags;
- resumes from its Tune checkpoint (or its work folder's, whichever is newer) when Tune retries it
  (`FailureConfig`) or the sweep is restored.

The experiment lives under `<runs_dir>/sweeps/<job id>` (a path every node sees), so a sweep
whose task died (service restart, lost lease) is picked up again with `Tuner.restore`: finished
trials are kept, unfinished ones continue from their checkpoints. The driver's Tune callback
writes every trial's state to `sweep.json` (and `progress.json`) in the sweep row's work folder;
the dispatcher copies that into the store.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from .execution import RowHandle
from .sweep_space import apply_sample, build_scheduler, flat_sample, tune_space
from .sweep_state import (FINAL, best_trial, read_state, trial_record, unflatten,
                          write_state)

log = logging.getLogger("certrepro.sweeps")

# Metrics a trial evaluates after each epoch from its checkpoint (on the test subset): the
# certifier or attack a metric needs. Training statistics (loss, ...) need nothing.
EVALUATED = ("clean_acc", "pgd_acc", "verified_acc.")
STATE_INTERVAL = 0.5  # seconds between two writes of the sweep's state file


@dataclass
class SweepContext:
    """Everything the sweep's task and its trials need; picklable (it travels to Ray workers)."""
    job_id: str
    sweep: dict[str, Any]  # the job's checked sweep settings (orchestrator.jobs.plan_sweep)
    base_config: dict[str, Any]  # resolved
    workdir: str  # the sweep row's work folder (sweep.json, progress.json)
    storage: str  # Tune's storage path; the experiment is <storage>/<job id>
    trials_dir: str  # the trials' work folders: <trials_dir>/<trial id>
    tracker: Any | None = None  # orchestrator.tracking.MLflowTracker
    parent_run_id: str | None = None
    experiment: str = "adhoc"
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def metric(self) -> str:
        return self.sweep["metric"]

    @property
    def experiment_path(self) -> Path:
        return Path(self.storage) / self.job_id


# -- the trial --------------------------------------------------------------------------------

def trial_config(base: dict[str, Any], sample: dict[str, Any], gpus: float) -> dict[str, Any]:
    from workers.core.config import resolve
    config = resolve(apply_sample(base, sample)).model_dump()
    if gpus > 0:
        config["device"] = "cuda"
    return config


def run_trial(sample: dict[str, Any], ctx: SweepContext) -> None:
    """Tune's trainable: one row with the sampled values."""
    import torch
    from ray import tune

    from workers.recorder import FanOut, NullRecorder, flatten
    from workers.runner import run_row

    resources = ctx.sweep["resources_per_trial"]
    torch.set_num_threads(max(1, int(resources["cpu"])))
    trial_id = tune.get_context().get_trial_id()
    config = trial_config(ctx.base_config, sample, resources["gpu"])
    workdir = Path(ctx.trials_dir) / trial_id
    workdir.mkdir(parents=True, exist_ok=True)
    _take_tune_checkpoint(workdir)
    recorder, run_id = NullRecorder(), None
    if ctx.tracker is not None:
        params = flat_sample(sample)
        recorder = ctx.tracker.trial_recorder(
            ctx.experiment, ctx.job_id, trial_id, ctx.parent_run_id,
            {**ctx.tags, "certrepro.sampled": json.dumps(params, sort_keys=True)},
            run_name=f"trial {trial_id}")
        recorder.log_params({f"sweep.{k}": v for k, v in params.items()})
        run_id = recorder.run_id
    reporter = EpochReporter(ctx.metric, config, workdir, run_id, recorder)
    result = _finished_result(workdir, config)  # a trial restored after it was certified
    if result is None:
        try:
            result = run_row(config, workdir, FanOut(recorder), after_epoch=reporter)
        except Exception:
            # the run is FAILED until Tune retries the trial (which sets it back to RUNNING)
            if run_id is not None:
                recorder.finish("FAILED")
            raise
    metrics = {**reporter.last_training, **flatten(result["metrics"])}
    if metrics.get(ctx.metric) is None:
        raise ValueError(f"the sweep's metric {ctx.metric!r} was not recorded; recorded: "
                         f"{', '.join(sorted(metrics))}")
    tune.report({ctx.metric: metrics[ctx.metric], FINAL: 1, "epochs": config["epochs"],
                 "metrics": metrics, "mlflow_run_id": run_id})


class EpochReporter:
    """`after_epoch` hook of the row runner: the epoch's metrics (and the sweep's metric,
    evaluated from the checkpoint when it is a certified one) to Tune, with the checkpoint."""

    def __init__(self, metric: str, config: dict[str, Any], workdir: Path, run_id: str | None,
                 recorder: Any):
        self.metric, self.config, self.workdir = metric, config, workdir
        self.run_id, self.recorder = run_id, recorder
        self.last_training: dict[str, float] = {}

    def __call__(self, epoch: int, means: dict[str, float]) -> None:
        from ray import tune

        self.last_training = dict(means)
        metrics = dict(means)
        if self.metric.startswith(EVALUATED):
            evaluated = evaluate(self.workdir / "checkpoint.pt", self.metric)
            self.recorder.log_metrics({f"epoch_eval.{k}": v for k, v in evaluated.items()},
                                      step=epoch)
            metrics.update(evaluated)
        if self.metric not in metrics:
            raise ValueError(f"the sweep's metric {self.metric!r} is not recorded after each "
                             f"epoch by method {self.config['method']!r}; it records: "
                             f"{', '.join(sorted(metrics))}")
        with tempfile.TemporaryDirectory(prefix="certrepro-ckpt-") as folder:
            shutil.copy2(self.workdir / "checkpoint.pt", Path(folder) / "checkpoint.pt")
            tune.report({"epoch": epoch, self.metric: metrics[self.metric], "metrics": metrics,
                         "mlflow_run_id": self.run_id},
                        checkpoint=tune.Checkpoint.from_directory(folder))


def evaluate(checkpoint: Path, metric: str) -> dict[str, float]:
    """The metric (and clean accuracy) of the checkpoint's model on the config's test subset,
    running only the certifier the metric needs and the attack only for pgd_acc."""
    from workers.recorder import flatten
    from workers.runner import certify_checkpoint

    overrides: dict[str, Any] = {"certifiers": []}
    if metric.startswith("verified_acc."):
        overrides["certifiers"] = [metric.split(".", 1)[1]]
    if metric != "pgd_acc":
        overrides["attack"] = {"steps": 0, "restarts": 1}
    metrics = flatten(certify_checkpoint(checkpoint, overrides)["metrics"])
    return {k: v for k, v in metrics.items() if k in (metric, "clean_acc")}


def _take_tune_checkpoint(workdir: Path) -> None:
    """Continue from Tune's checkpoint of this trial where it is newer than the work folder's
    (a retry on another node, or a restored sweep whose work folder is gone)."""
    from ray import tune

    from workers.core.train import load_checkpoint

    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return
    local = workdir / "checkpoint.pt"
    with checkpoint.as_directory() as folder:
        saved = Path(folder) / "checkpoint.pt"
        if not saved.exists():
            return
        if local.exists() and load_checkpoint(local)["epoch"] >= load_checkpoint(saved)["epoch"]:
            return
        shutil.copy2(saved, local)


def _finished_result(workdir: Path, config: dict[str, Any]) -> dict[str, Any] | None:
    """The result.json of this very config in the trial's folder: the trial was certified before
    its sweep stopped, so it is not run again."""
    try:
        result = json.loads((workdir / "result.json").read_text())
    except (OSError, ValueError):
        return None
    return result if result.get("config") == config else None


# -- the driver -------------------------------------------------------------------------------

def _tune_callback_class():
    from ray.tune import Callback

    class SweepCallback(Callback):
        """Writes every trial's record to the sweep's state file when one changes, and closes
        each trial's MLflow run when Tune ends the trial."""

        def __init__(self, ctx: SweepContext):
            self.ctx = ctx
            self._written: str | None = None
            self._synced_at = 0.0

        def _sync(self, trials: list) -> None:
            self._synced_at = time.monotonic()
            records = [trial_record(t) for t in trials]
            text = json.dumps(records, sort_keys=True, default=str)
            if text != self._written:
                write_state(self.ctx.workdir, records, self.ctx.sweep["trials"],
                            self.ctx.metric, self.ctx.sweep["mode"])
                self._written = text

        def on_step_end(self, iteration: int, trials: list, **info) -> None:
            # Tune's loop steps many times a second: results are written at most every
            # STATE_INTERVAL (a trial's start, end or error is written at once)
            if time.monotonic() - self._synced_at >= STATE_INTERVAL:
                self._sync(trials)

        def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
            self._sync(trials)

        def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
            record = trial_record(trial)
            self._end_run(record, "FINISHED")
            self._sync(trials)

        def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
            self._end_run(trial_record(trial), "FAILED")
            self._sync(trials)

        def on_experiment_end(self, trials: list, **info) -> None:
            self._sync(trials)

        def _end_run(self, record: dict[str, Any], status: str) -> None:
            tracker, run_id = self.ctx.tracker, record.get("mlflow_run_id")
            if tracker is None or not run_id:
                return
            try:
                from .tracking import MLflowRecorder
                MLflowRecorder(tracker.tracking_uri, run_id).set_tags(
                    {"certrepro.trial_status": record["status"],
                     "certrepro.stopped_early": str(record["stopped_early"]).lower()})
                tracker.finish(run_id, status)
            except Exception as error:  # MLflow down: the sweep goes on
                log.warning("could not close the MLflow run of trial %s: %s",
                            record["trial_id"], error)

    return SweepCallback


def build_tuner(ctx: SweepContext):
    """A new Tuner for the sweep, or the restored one when its experiment folder has one."""
    from ray import tune

    sweep = ctx.sweep
    resources = sweep["resources_per_trial"]
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx),
                                    {"cpu": resources["cpu"], "gpu": resources["gpu"]})
    path = str(ctx.experiment_path)
    if tune.Tuner.can_restore(path):
        log.info("restoring sweep %s from %s", ctx.job_id, path)
        return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
    return tune.Tuner(
        trainable,
        param_space=tune_space(sweep["search_space"]),
        tune_config=tune.TuneConfig(
            metric=ctx.metric, mode=sweep["mode"], num_samples=sweep["num_samples"],
            scheduler=build_scheduler(sweep["scheduler"]),
            max_concurrent_trials=sweep.get("max_concurrent_trials")),
        run_config=tune.RunConfig(
            name=ctx.job_id, storage_path=ctx.storage, verbose=0,
            failure_config=tune.FailureConfig(max_failures=sweep["max_failures"]),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            callbacks=[_tune_callback_class()(ctx)]))


def run_sweep(ctx: SweepContext) -> dict[str, Any]:
    """Body of the sweep's Ray task: run (or restore) the Tuner until every trial ended; the
    best trial goes on the job's MLflow run. Returns the row result of the sweep."""
    # the experiment state (which trials ended) is saved at least every second, so a sweep killed
    # right after a trial finished does not restore that trial as unfinished
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    Path(ctx.workdir).mkdir(parents=True, exist_ok=True)
    build_tuner(ctx).fit()
    trials = (read_state(ctx.workdir) or {}).get("trials", [])
    best = best_trial(trials, ctx.metric, ctx.sweep["mode"])
    if best is None or not best["final"]:
        errors = "; ".join(f"{t['trial_id']}: {t['error']}" for t in trials if t.get("error"))
        raise RuntimeError(f"no trial of the sweep was certified ({len(trials)} trials"
                           + (f"; errors: {errors}" if errors else "") + ")")
    config = trial_config(ctx.base_config, best["params"], 0)
    if ctx.tracker is not None and ctx.parent_run_id:
        ctx.tracker.log_best_trial(ctx.parent_run_id, best, config)
    return {"metrics": unflatten(best["metrics"]), "best": best, "trials": trials,
            "config": config, "experiment_path": str(ctx.experiment_path)}


_remote_sweep = ray.remote(max_retries=0)(run_sweep)  # retries are the dispatcher's business


def sweep_context(job: Any, row: Any, workdir: Path, settings: Any,
                  tracking: Any | None) -> SweepContext:
    """The context of a sweep job's row (orchestrator.store views, the service's settings and
    its orchestrator.service.Tracking, or None without MLflow)."""
    config = row.config
    ctx = SweepContext(job_id=job.id, sweep=job.body["_sweep"], base_config=config,
                       workdir=str(workdir), storage=str(settings.runs_dir / "sweeps"),
                       trials_dir=str(settings.runs_dir / job.id / "trials"))
    if tracking is None:
        return ctx
    try:
        ctx.parent_run_id = tracking.job_run(job)
    except Exception as error:  # MLflow down: the sweep still runs, without tracking
        log.warning("MLflow unavailable for sweep %s: %s", job.id, error)
        return ctx
    ctx.tracker, ctx.experiment = tracking.tracker, tracking.experiment(job)
    ctx.tags = {"certrepro.table": job.spec or "", "certrepro.sweep": job.id,
                "certrepro.method": config["method"], "certrepro.dataset": config["dataset"],
                "certrepro.model": config["model"], "certrepro.profile": job.profile or "",
                "certrepro.git_commit": tracking.commit}
    return ctx


def submit_sweep(ctx: SweepContext, row_id: str) -> RowHandle:
    """Start the sweep's task. It holds no CPU of its own (its trials hold theirs), so a sweep
    never blocks the trials it waits for."""
    ref = _remote_sweep.options(num_cpus=0, name=f"sweep-{ctx.job_id[:8]}").remote(ctx)
    return RowHandle(row_id, ref, Path(ctx.workdir))

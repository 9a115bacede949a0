"""MLflow bookkeeping of jobs and rows, through `MlflowClient(tracking_uri)` only.

No global MLflow state (`mlflow.set_tracking_uri`, `mlflow.start_run`): the service logs many rows
from one process, and a Ray worker may run several rows at once.

Layout in MLflow:

- one experiment per table spec (`ibp/table4`, ...) and `adhoc` for run jobs;
- one parent run per job, tagged `certrepro.job_id=<job>` and `certrepro.kind=job`;
- one nested run per row (`mlflow.parentRunId` = the job's run), tagged `certrepro.job_id`,
  `certrepro.row_id` and `certrepro.kind=row`;
- for a sweep job, one nested run per Ray Tune trial under the job's run, tagged
  `certrepro.job_id`, `certrepro.trial_id` and `certrepro.kind=trial`; the best trial's config
  and metrics go on the job's run when the sweep ends.

Runs are found again by those tags, so a retried or resumed row continues its own run (a FAILED or
KILLED one is set back to RUNNING) instead of opening a second one.

`MLflowRecorder` implements `workers.recorder.Recorder` for one row's run. It is picklable (it
travels to Ray workers): its state is the tracking URI and the run id, the client is made lazily.
"""
from __future__ import annotations

import json
import logging
import math
import numbers
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import urlsplit, urlunsplit

from mlflow.entities import Metric, Param, RunTag, ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

log = logging.getLogger(__name__)

TAG_JOB = "certrepro.job_id"
TAG_ROW = "certrepro.row_id"
TAG_TRIAL = "certrepro.trial_id"
TAG_KIND = "certrepro.kind"  # "job" | "row" | "trial"
TAG_PARAMS_CHANGED = "certrepro.params_changed"  # JSON {key: {"logged": old, "new": new}}

STATUSES = ("FINISHED", "FAILED", "KILLED")
TABLE_FILES = ("table.md", "table.csv", "table.json")

# MLflow's limits (mlflow.utils.validation, 3.x): values longer than these are rejected.
MAX_KEY_LENGTH = 250
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000

_BAD_KEY_CHARS = re.compile(r"[^/\w.\- :]")  # what MLflow accepts in param/metric/tag names


def _key(name: Any) -> str:
    """A name MLflow accepts: other characters become '_', cut to 250 characters."""
    return _BAD_KEY_CHARS.sub("_", str(name))[:MAX_KEY_LENGTH] or "_"


def _truncate(value: Any, limit: int) -> str:
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return text
    marker = "...[truncated]"
    return text[:limit - len(marker)] + marker


def _chunks(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _as_float(value: Any) -> float | None:
    """A finite float, or None for what is not a number (strings, None, NaN, inf, lists...)."""
    if isinstance(value, (str, bytes)) or value is None:
        return None
    if not isinstance(value, numbers.Real):
        item = getattr(value, "item", None)  # 0-d numpy array / torch tensor
        if item is None or getattr(value, "ndim", 0) != 0:
            return None
        try:
            value = item()
        except (TypeError, ValueError, RuntimeError):
            return None
        if not isinstance(value, numbers.Real):
            return None
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def _quote(value: str) -> str | None:
    """A string literal for an MLflow search filter, or None where MLflow's filter grammar cannot
    express it (it knows no escapes: a value with both quote kinds is matched client-side)."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    return None


def _now_ms() -> int:
    return int(time.time() * 1000)


class _ClientHolder:
    """Lazy `MlflowClient`, dropped when pickled (only the URI travels)."""

    tracking_uri: str
    _client: MlflowClient | None

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_client"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._client = None


class MLflowTracker(_ClientHolder):
    """Experiments, job runs and row runs of the service on one MLflow tracking server."""

    def __init__(self, tracking_uri: str, public_url: str | None = None):
        self.tracking_uri = str(tracking_uri)
        self.public_url = public_url
        self._client = None
        self._experiments: dict[str, str] = {}

    # --- experiments ---------------------------------------------------------------------
    def experiment_id(self, name: str) -> str:
        """The id of experiment `name`, created on first use (a deleted one is restored)."""
        cached = self._experiments.get(name)
        if cached is not None:
            return cached
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            try:
                experiment_id = self.client.create_experiment(name)
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                experiment = self.client.get_experiment_by_name(name)  # created concurrently
                if experiment is None:
                    raise
                experiment_id = experiment.experiment_id
        else:
            experiment_id = experiment.experiment_id
            if experiment.lifecycle_stage == "deleted":
                self.client.restore_experiment(experiment_id)
        self._experiments[name] = experiment_id
        return experiment_id

    def _existing_experiment_id(self, name: str) -> str | None:
        if name in self._experiments:
            return self._experiments[name]
        experiment = self.client.get_experiment_by_name(name)
        return None if experiment is None else experiment.experiment_id

    # --- runs ----------------------------------------------------------------------------
    def job_run(self, experiment: str, job_id: str, tags: dict[str, str] | None = None,
                run_name: str | None = None) -> str:
        """The job's parent run (found again by its tags, or created); returns its run id. A
        found run that is FAILED or KILLED (a job retried or recovered) is set back to RUNNING."""
        key = {TAG_JOB: str(job_id), TAG_KIND: "job"}
        run_id = self._get_or_create(experiment, key, tags, run_name)
        return run_id

    def row_recorder(self, experiment: str, job_id: str, row_id: str, parent_run_id: str | None,
                     tags: dict[str, str] | None = None,
                     run_name: str | None = None) -> "MLflowRecorder":
        """A recorder on the row's run, nested under `parent_run_id`. The run is found again by
        (job, row) so that a retried or resumed row continues its own run; a FAILED or KILLED one
        is set back to RUNNING."""
        key = {TAG_JOB: str(job_id), TAG_ROW: str(row_id), TAG_KIND: "row"}
        return self._nested_recorder(experiment, key, parent_run_id, tags, run_name)

    def trial_recorder(self, experiment: str, job_id: str, trial_id: str,
                       parent_run_id: str | None, tags: dict[str, str] | None = None,
                       run_name: str | None = None) -> "MLflowRecorder":
        """A recorder on a sweep trial's run, nested under the sweep's run and found again by
        (job, trial): a trial that Tune retries or restores continues its own run."""
        key = {TAG_JOB: str(job_id), TAG_TRIAL: str(trial_id), TAG_KIND: "trial"}
        return self._nested_recorder(experiment, key, parent_run_id, tags, run_name)

    def _nested_recorder(self, experiment: str, key: dict[str, str], parent_run_id: str | None,
                         tags: dict[str, str] | None, run_name: str | None) -> "MLflowRecorder":
        extra = dict(tags or {})
        if parent_run_id:
            extra[MLFLOW_PARENT_RUN_ID] = parent_run_id
        run_id = self._get_or_create(experiment, key, extra, run_name)
        return MLflowRecorder(self.tracking_uri, run_id)

    def log_best_trial(self, run_id: str, best: dict[str, Any], config: dict[str, Any]) -> None:
        """The best trial of a sweep on the sweep's run: its id and sampled values as tags, its
        metrics as `best.<name>`, its full resolved config as best_config.json. Tags and metrics
        (not params) so that a sweep that is resumed and ends again can update them."""
        recorder = MLflowRecorder(self.tracking_uri, run_id)
        recorder.set_tags({"certrepro.best_trial": best["trial_id"],
                           "certrepro.best_params": json.dumps(best["params"], sort_keys=True),
                           **{f"best.{k}": v for k, v in best["params"].items()}})
        recorder.log_metrics({f"best.{k}": v for k, v in best["metrics"].items()}, step=0)
        recorder.log_text(json.dumps({"trial_id": best["trial_id"], "params": best["params"],
                                      "metrics": best["metrics"], "config": config},
                                     indent=1, sort_keys=True), "best_config.json")

    def _get_or_create(self, experiment: str, key: dict[str, str],
                       tags: dict[str, str] | None, run_name: str | None) -> str:
        experiment_id = self.experiment_id(experiment)
        found = self._search(experiment_id, key)
        if found:
            if len(found) > 1:
                log.warning("%d MLflow runs carry the tags %s; using the oldest, %s",
                            len(found), key, found[0].info.run_id)
            run = found[0]
            run_id = run.info.run_id
            if run.info.status in ("FAILED", "KILLED"):
                self.client.update_run(run_id, status="RUNNING")
            if tags:
                changed = {k: v for k, v in tags.items()
                           if run.data.tags.get(_key(k)) != _truncate(v, MAX_TAG_VALUE_LENGTH)}
                if changed:
                    self._set_tags(run_id, changed)
            return run_id
        all_tags = {_key(k): _truncate(v, MAX_TAG_VALUE_LENGTH) for k, v in (tags or {}).items()}
        all_tags.update(key)
        run = self.client.create_run(experiment_id, tags=all_tags, run_name=run_name)
        return run.info.run_id

    def _search(self, experiment_id: str, tags: dict[str, str]) -> list:
        """Active runs of the experiment whose tags equal `tags`, oldest first."""
        clauses = []
        for key, value in tags.items():
            quoted = _quote(str(value))
            if quoted is not None and "`" not in key:
                clauses.append(f"tags.`{key}` = {quoted}")
        runs, token = [], None
        while True:
            page = self.client.search_runs(
                [experiment_id], filter_string=" and ".join(clauses),
                run_view_type=ViewType.ACTIVE_ONLY, max_results=1000,
                order_by=["attributes.start_time ASC"], page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                break
        return [run for run in runs
                if all(run.data.tags.get(k) == str(v) for k, v in tags.items())]

    def find_runs(self, experiment: str, **tags: str) -> list:
        """Active runs of `experiment` whose tags match (`find_runs("adhoc", **{TAG_JOB: id})`),
        oldest first; [] when the experiment does not exist."""
        experiment_id = self._existing_experiment_id(experiment)
        if experiment_id is None:
            return []
        return self._search(experiment_id, {k: str(v) for k, v in tags.items()})

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        _finish(self.client, run_id, status)

    def _set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        _set_tags(self.client, run_id, tags)

    # --- tables and links ----------------------------------------------------------------
    def log_table(self, run_id: str, markdown: str, csv: str, rows: list[dict]) -> None:
        """table.md, table.csv and (MLflow's table format, shown in the UI's artifact view and
        readable with `client.load_table`) table.json on `run_id`; logging again replaces them."""
        self.client.log_text(run_id, markdown, "table.md")
        self.client.log_text(run_id, csv, "table.csv")
        columns = _columns(rows)
        # client.log_table APPENDS to an existing table.json: remove the old one first so that a
        # re-assembled table replaces it.
        if any(f.path == "table.json" for f in self.client.list_artifacts(run_id)):
            try:
                self._delete_artifact(run_id, "table.json")
            except Exception as exc:  # a store without delete: write the same format ourselves
                log.warning("could not delete the old table.json of run %s (%s); overwriting it",
                            run_id, exc)
                import pandas as pd

                text = pd.DataFrame(columns).to_json(orient="split", index=False,
                                                      date_format="iso")
                self.client.log_text(run_id, text, "table.json")
                return
        self.client.log_table(run_id, data=columns, artifact_file="table.json")

    def log_figures(self, run_id: str, figures: dict[str, bytes]) -> None:
        """PNG bytes by name, as figures/<name>.png on `run_id` (logging again replaces them)."""
        if not figures:
            return
        with tempfile.TemporaryDirectory() as folder:
            for name, png in figures.items():
                (Path(folder) / f"{name}.png").write_bytes(png)
            self.client.log_artifacts(run_id, folder, "figures")

    def _delete_artifact(self, run_id: str, path: str) -> None:
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        artifact_uri = self.client.get_run(run_id).info.artifact_uri
        get_artifact_repository(artifact_uri, tracking_uri=self.tracking_uri).delete_artifacts(path)

    @property
    def ui_base(self) -> str:
        """The MLflow UI's address: the public URL when one is set, else the tracking URI when it
        is http(s) (credentials removed)."""
        parts = urlsplit(self.public_url or self.tracking_uri)
        if parts.scheme not in ("http", "https"):
            return ""
        netloc = parts.netloc.rsplit("@", 1)[-1]
        return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))

    def run_link(self, run_id: str) -> str:
        """A link to the run in the MLflow UI; "" where the tracking URI is no web server."""
        base = self.ui_base
        if not base:
            return ""
        experiment_id = self.client.get_run(run_id).info.experiment_id
        return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"

    def __repr__(self) -> str:
        return f"MLflowTracker({self.tracking_uri!r})"


class MLflowRecorder(_ClientHolder):
    """`workers.recorder.Recorder` on one MLflow run. Picklable: state is the URI and run id."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.tracking_uri = str(tracking_uri)
        self.run_id = run_id
        self._client = None

    def log_params(self, params: dict[str, Any]) -> None:
        """Values are str()-ed and cut to MLflow's limit. MLflow refuses to change a logged param
        (and fails the whole batch): on a resumed run, identical values are skipped and a changed
        value is reported in the `certrepro.params_changed` tag (and a warning) instead."""
        wanted: dict[str, str] = {}
        for key, value in params.items():
            wanted[_key(key)] = _truncate(value, MAX_PARAM_VALUE_LENGTH)
        if not wanted:
            return
        run = self.client.get_run(self.run_id)
        logged = run.data.params
        new = [Param(k, v) for k, v in wanted.items() if k not in logged]
        changed = {k: {"logged": logged[k], "new": v}
                   for k, v in wanted.items() if k in logged and logged[k] != v}
        for chunk in _chunks(new, MAX_PARAMS_TAGS_PER_BATCH):
            try:
                self.client.log_batch(self.run_id, params=chunk)
            except MlflowException as exc:
                if exc.error_code != "INVALID_PARAMETER_VALUE":
                    raise
                # someone logged some of these meanwhile: one by one, keeping what is there
                for param in chunk:
                    try:
                        self.client.log_param(self.run_id, param.key, param.value)
                    except MlflowException:
                        current = self.client.get_run(self.run_id).data.params.get(param.key)
                        if current is not None and current != param.value:
                            changed[param.key] = {"logged": current, "new": param.value}
        if changed:
            log.warning("run %s: params changed since they were logged (MLflow keeps the first "
                        "values): %s", self.run_id, sorted(changed))
            previous = run.data.tags.get(TAG_PARAMS_CHANGED)
            try:
                merged = json.loads(previous) if previous else {}
            except ValueError:
                merged = {}
            merged.update(changed)
            self.set_tags({TAG_PARAMS_CHANGED: json.dumps(merged, sort_keys=True)})

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        """One batch per 1000 metrics; values that are not finite numbers are skipped."""
        timestamp = _now_ms()
        entries = []
        for key, value in metrics.items():
            number = _as_float(value)
            if number is not None:
                entries.append(Metric(_key(key), number, timestamp, int(step)))
        for chunk in _chunks(entries, MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=chunk)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """A file (or a folder's content) into the run's artifacts, through the server."""
        path = os.fspath(path)
        if os.path.isdir(path):
            self.client.log_artifacts(self.run_id, path, artifact_path)
        else:
            self.client.log_artifact(self.run_id, path, artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def set_tags(self, tags: dict[str, Any]) -> None:
        _set_tags(self.client, self.run_id, tags)

    def finish(self, status: str = "FINISHED") -> None:
        _finish(self.client, self.run_id, status)

    def __repr__(self) -> str:
        return f"MLflowRecorder({self.tracking_uri!r}, {self.run_id!r})"


def _set_tags(client: MlflowClient, run_id: str, tags: dict[str, Any]) -> None:
    entries = [RunTag(_key(k), _truncate(v, MAX_TAG_VALUE_LENGTH)) for k, v in tags.items()]
    for chunk in _chunks(entries, MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, tags=chunk)


def _finish(client: MlflowClient, run_id: str, status: str) -> None:
    status = status.upper()
    if status not in STATUSES:
        raise ValueError(f"unknown run status {status!r}; expected one of {', '.join(STATUSES)}")
    client.set_terminated(run_id, status=status)


def _columns(rows: list[dict]) -> dict[str, list]:
    """Rows (dicts, keys may differ) -> columns for `client.log_table`; values that JSON cannot
    hold as they are become strings."""
    names: list[str] = []
    for row in rows:
        for name in row:
            if name not in names:
                names.append(name)
    return {str(name): [_cell(row.get(name)) for row in rows] for name in names}


def _cell(value: Any) -> Any:
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    number = _as_float(value)
    if number is not None and not isinstance(value, (list, tuple, dict)):
        return number
    try:
        return json.dumps(value, default=str)
    except (TypeError, ValueError):
        return str(value)

"""MLflow tracking against one real `mlflow server` child process (SQLite, proxied artifacts)."""
from __future__ import annotations

import json
import pickle
import socket
import sys
import time
from pathlib import Path

import pytest

from orchestrator.mlflow_server import MLflowServer, MLflowServerError, _pid_alive
from orchestrator.tracking import (TAG_JOB, TAG_KIND, TAG_PARAMS_CHANGED, TAG_ROW, MLflowRecorder,
                                   MLflowTracker)

PARENT = "mlflow.parentRunId"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("mlflow-home")
    with MLflowServer(home) as srv:
        print(f"MLflow server started in {srv.start_seconds:.1f} s at {srv.url}")
        yield srv


@pytest.fixture(scope="module")
def tracker(server):
    return MLflowTracker(server.url)


def _on_disk(server: MLflowServer, tracker: MLflowTracker, run_id: str, name: str) -> Path:
    """Where the server's artifacts-destination holds `name` of `run_id`."""
    run = tracker.client.get_run(run_id)
    # artifact_uri = mlflow-artifacts:/<experiment>/<run>/artifacts
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/"), run.info.artifact_uri
    relative = run.info.artifact_uri[len("mlflow-artifacts:/"):].strip("/")
    return server.artifacts_destination / relative / name


def test_server_is_up(server):
    assert server.is_running()
    assert server.url.startswith("http://127.0.0.1:")
    assert server.port != 0
    assert (server.home / "mlflow.db").exists()
    assert (server.home / "mlflow-server.log").exists()


def test_experiment_get_or_create_is_idempotent(tracker, server):
    first = tracker.experiment_id("ibp/table4")
    assert tracker.experiment_id("ibp/table4") == first
    # a fresh tracker (no cache) finds the same experiment
    assert MLflowTracker(server.url).experiment_id("ibp/table4") == first
    assert MLflowTracker(server.url).experiment_id("adhoc") != first
    copy = pickle.loads(pickle.dumps(tracker))  # the tracker travels too, without its client
    assert copy._client is None and copy.experiment_id("ibp/table4") == first


def test_job_run_found_again(tracker):
    run_id = tracker.job_run("ibp/table4", "job-1", tags={"certrepro.spec": "ibp/table4"},
                             run_name="job-1")
    assert tracker.job_run("ibp/table4", "job-1") == run_id
    assert MLflowTracker(tracker.tracking_uri).job_run("ibp/table4", "job-1") == run_id
    assert tracker.job_run("ibp/table4", "job-2") != run_id
    runs = tracker.find_runs("ibp/table4", **{TAG_JOB: "job-1", TAG_KIND: "job"})
    assert [r.info.run_id for r in runs] == [run_id]
    assert runs[0].data.tags["certrepro.spec"] == "ibp/table4"
    assert runs[0].info.run_name == "job-1"


def test_row_run_found_again_and_nested(tracker):
    parent = tracker.job_run("ibp/table4", "job-rows")
    rec = tracker.row_recorder("ibp/table4", "job-rows", "row-a", parent, run_name="row-a")
    again = tracker.row_recorder("ibp/table4", "job-rows", "row-a", parent)
    other = tracker.row_recorder("ibp/table4", "job-rows", "row-b", parent)
    assert isinstance(rec, MLflowRecorder)
    assert again.run_id == rec.run_id
    assert other.run_id != rec.run_id
    run = tracker.client.get_run(rec.run_id)
    assert run.data.tags[PARENT] == parent
    assert run.data.tags[TAG_ROW] == "row-a" and run.data.tags[TAG_KIND] == "row"
    runs = tracker.find_runs("ibp/table4", **{TAG_JOB: "job-rows", TAG_ROW: "row-a"})
    assert [r.info.run_id for r in runs] == [rec.run_id]
    rows = tracker.find_runs("ibp/table4", **{TAG_JOB: "job-rows", TAG_KIND: "row"})
    assert sorted(r.info.run_id for r in rows) == sorted([rec.run_id, other.run_id])
    # the parent is not mistaken for a row and vice versa
    assert tracker.job_run("ibp/table4", "job-rows") == parent
    assert tracker.find_runs("no/such-experiment", **{TAG_JOB: "job-rows"}) == []


def test_failed_row_is_reopened(tracker):
    parent = tracker.job_run("adhoc", "job-retry")
    rec = tracker.row_recorder("adhoc", "job-retry", "0", parent)
    tracker.finish(rec.run_id, "FAILED")
    assert tracker.client.get_run(rec.run_id).info.status == "FAILED"
    again = tracker.row_recorder("adhoc", "job-retry", "0", parent)
    assert again.run_id == rec.run_id
    assert tracker.client.get_run(rec.run_id).info.status == "RUNNING"
    again.finish("KILLED")
    assert tracker.client.get_run(rec.run_id).info.status == "KILLED"
    tracker.row_recorder("adhoc", "job-retry", "0", parent).finish()
    assert tracker.client.get_run(rec.run_id).info.status == "FINISHED"
    with pytest.raises(ValueError, match="FINISHED"):
        tracker.finish(rec.run_id, "DONE")


def test_tag_values_with_quotes_are_found(tracker):
    weird = """it's a "row" """
    rec = tracker.row_recorder("adhoc", "job-'quoted'", weird, None)
    assert tracker.row_recorder("adhoc", "job-'quoted'", weird, None).run_id == rec.run_id
    assert PARENT not in tracker.client.get_run(rec.run_id).data.tags


def test_pickled_recorder_logs_params_metrics_artifacts(tracker, server, tmp_path):
    parent = tracker.job_run("adhoc", "job-pickle")
    original = tracker.row_recorder("adhoc", "job-pickle", "0", parent)
    original.log_params({"warm": 1})  # creates the client
    assert original._client is not None
    blob = pickle.dumps(original)
    rec = pickle.loads(blob)
    assert rec._client is None and rec.run_id == original.run_id
    assert rec.tracking_uri == tracker.tracking_uri

    params = {"method": "ibp", "eps": 0.3, "certifiers": ["ibp", "crown_ibp"], "seed": None,
              "long": "x" * 10000, "schedule.kappa": 0.5}
    rec.log_params(params)
    rec.log_params(params)  # a resumed row logs the same config again: fine
    rec.log_params({"eps": 0.4, "new_key": 7})  # changed value: no crash, a warning tag
    run = tracker.client.get_run(rec.run_id)
    assert run.data.params["method"] == "ibp"
    assert run.data.params["eps"] == "0.3"  # MLflow keeps the first value
    assert run.data.params["new_key"] == "7"
    assert run.data.params["certifiers"] == "['ibp', 'crown_ibp']"
    assert len(run.data.params["long"]) <= 6000
    changed = json.loads(run.data.tags[TAG_PARAMS_CHANGED])
    assert changed == {"eps": {"logged": "0.3", "new": "0.4"}}

    for epoch in range(3):
        rec.log_metrics({"loss": 1.0 / (epoch + 1), "acc": 0.5 + 0.1 * epoch,
                         "note": "text", "bad": float("nan"), "inf": float("inf"),
                         "none": None, "flag": True}, step=epoch)
    rec.log_metrics({"verified_acc.ibp": 0.8}, step=3)
    history = tracker.client.get_metric_history(rec.run_id, "loss")
    assert [(m.step, round(m.value, 6)) for m in sorted(history, key=lambda m: m.step)] == \
        [(0, 1.0), (1, 0.5), (2, round(1 / 3, 6))]
    metrics = tracker.client.get_run(rec.run_id).data.metrics
    assert metrics["verified_acc.ibp"] == 0.8
    assert metrics["flag"] == 1.0
    assert not {"note", "bad", "inf", "none"} & set(metrics)

    result = tmp_path / "result.json"
    result.write_text('{"metrics": {}}')
    rec.log_artifact(str(result))
    rec.log_artifact(str(result), artifact_path="checkpoints")
    names = {f.path for f in tracker.client.list_artifacts(rec.run_id)}
    assert {"result.json", "checkpoints"} <= names
    on_disk = _on_disk(server, tracker, rec.run_id, "result.json")
    assert on_disk.read_text() == '{"metrics": {}}'
    assert _on_disk(server, tracker, rec.run_id, "checkpoints/result.json").exists()

    rec.set_tags({"certrepro.attempt": 2})
    assert tracker.client.get_run(rec.run_id).data.tags["certrepro.attempt"] == "2"
    # pickling again after use still carries no client
    assert pickle.loads(pickle.dumps(rec))._client is None


def test_log_table_artifacts_land_on_server_disk(tracker, server):
    run_id = tracker.job_run("bcp/table2", "job-table")
    rows = [{"row": "a", "clean_acc": 0.9, "verified_acc": {"ibp": 0.7}},
            {"row": "b", "clean_acc": 0.8, "paper": 0.81}]
    markdown = "| row | clean |\n| --- | --- |\n| a | 0.9 |\n| b | 0.8 |\n"
    csv = "row,clean\na,0.9\nb,0.8\n"
    tracker.log_table(run_id, markdown, csv, rows)
    names = {f.path for f in tracker.client.list_artifacts(run_id)}
    assert {"table.md", "table.csv", "table.json"} <= names
    for name in ("table.md", "table.csv", "table.json"):
        assert _on_disk(server, tracker, run_id, name).is_file(), name
    assert _on_disk(server, tracker, run_id, "table.md").read_text() == markdown
    table = json.loads(_on_disk(server, tracker, run_id, "table.json").read_text())
    assert table["columns"] == ["row", "clean_acc", "verified_acc", "paper"]
    assert len(table["data"]) == 2
    # assembling the table again replaces it (MLflow's log_table alone would append)
    tracker.log_table(run_id, markdown, csv, rows[:1])
    table = json.loads(_on_disk(server, tracker, run_id, "table.json").read_text())
    assert len(table["data"]) == 1
    # (not client.load_table: it searches runs through the GLOBAL tracking URI, mlflow.db in cwd)
    assert table["data"][0][0] == "a"


def test_run_link(tracker):
    run_id = tracker.job_run("adhoc", "job-link")
    link = tracker.run_link(run_id)
    assert link.startswith(tracker.tracking_uri + "/#/experiments/")
    assert link.endswith(f"/runs/{run_id}")
    assert MLflowTracker("sqlite:///x.db").ui_base == ""
    assert MLflowTracker("http://u:p@host:5000/").ui_base == "http://host:5000"
    # in a cluster the tracking URI is an inside name; links go to the published address
    public = MLflowTracker(tracker.tracking_uri, "https://mlflow.example.org/")
    assert public.run_link(run_id).startswith("https://mlflow.example.org/#/experiments/")


def test_git_commit_from_the_environment_first(monkeypatch):
    from orchestrator.service import git_commit

    monkeypatch.delenv("CERTREPRO_GIT_COMMIT", raising=False)
    assert len(git_commit()) == 40 or git_commit() == "unknown"  # this checkout's HEAD, or none
    monkeypatch.setenv("CERTREPRO_GIT_COMMIT", "0123abc")  # what an image's build sets
    assert git_commit() == "0123abc"


def test_server_stop_leaves_no_process(tmp_path):
    server = MLflowServer(tmp_path / "home")
    with server:
        pids = server.pids()
        assert server.pid in pids and len(pids) >= 2  # the mlflow CLI and its uvicorn
        assert server.is_running()
    assert not server.is_running()
    deadline = time.monotonic() + 5
    while any(_pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in pids if _pid_alive(p)]
    server.stop()  # stopping twice is fine


def test_server_port_in_use_is_a_clear_error(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        server = MLflowServer(tmp_path / "home", port=port)
        with pytest.raises(MLflowServerError, match=f"127.0.0.1:{port} is already in use"):
            server.start(timeout=20)
        assert not server.is_running()


class _CrashingServer(MLflowServer):
    def command(self):
        return [sys.executable, "-c", "import sys; print('boom: no database'); sys.exit(3)"]


def test_server_that_exits_reports_its_log(tmp_path):
    server = _CrashingServer(tmp_path / "home")
    with pytest.raises(MLflowServerError, match=r"exited with code 3(.|\n)*boom: no database"):
        server.start(timeout=20)
    assert not server.is_running()

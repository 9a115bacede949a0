"""One row of every paper table runs through the real service at the `smoke` profile (one epoch
on a few examples): the specs' configs, methods, models and certifiers fit together end to end.
Specs that are sweeps run in tests/e2e/test_sweeps.py."""
from __future__ import annotations

import pytest

import experiments
from orchestrator.jobs import JobRequestError, plan_table
from tests.e2e.test_service import ServiceProcess, finished, mlflow_server  # noqa: F401

pytestmark = pytest.mark.slow


def first_runnable_row(name: str) -> str | None:
    """The first row of the spec that certrepro can run (others wait on undefined models,
    families or methods: the spec tests list them)."""
    for row in experiments.load_spec(name).rows:
        try:
            if plan_table(name, [row.id], "smoke", [0]).rows:
                return row.id
        except JobRequestError:
            continue
    return None


def test_smoke_profile_needs_no_data_folder_and_no_mip():
    for name in experiments.list_specs():
        spec = experiments.load_spec(name)
        for _, _, config in experiments.row_configs(spec, "smoke"):
            assert config["dataset"] not in ("mnist-idx", "mnist") and "data_root" not in config
            assert config["epochs"] == 1 and config["test_limit"] == 8
            assert "mip" not in config["certifiers"] and config["certifiers"]


def test_one_row_of_every_table_runs_through_the_service(mlflow_server, tmp_path):
    tables = [name for name in experiments.list_specs()
              if experiments.load_spec(name).sweep is None]
    selected = {name: first_runnable_row(name) for name in tables}
    runnable = {name: row for name, row in selected.items() if row is not None}
    # Only tables whose every row waits on something undefined have nothing to run.
    assert set(selected) - set(runnable) <= {"crown003/table2"}, selected
    # One store is enough here: the job store's dialects are tested in tests/orchestrator.
    service = ServiceProcess(tmp_path, f"sqlite:///{tmp_path / 'jobs.db'}",
                             mlflow_server.url).start()
    try:
        client = service.client
        jobs = {name: client.submit({"kind": "table", "spec": name, "rows": [row],
                                     "profile": "smoke"})
                for name, row in runnable.items()}
        for name, job in jobs.items():
            done = finished(client, job["id"], timeout=600)
            assert done["status"] == "succeeded", (name, done["rows"])
            table = client.table(job["id"], "json")
            assert runnable[name] in table and "smoke" in table
    finally:
        service.stop()

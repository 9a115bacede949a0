"""Shared trainings through the real service (`certrepro serve`, local Ray, an MLflow server): rows
of a figure spec that train the same model train it once, the others certify its checkpoint at
their own eps; a training row that fails takes its waiting rows with it, naming it."""
from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from tests.e2e.test_service import ServiceProcess, finished, mlflow_server, wait_for  # noqa: F401

pytestmark = pytest.mark.slow

TRAIN_01 = ["ibp-small-train0.1-eps0.1", "ibp-small-train0.1-eps0.2", "ibp-small-train0.1-eps0.3"]
TRAIN_02 = ["ibp-small-train0.2-eps0.1"]


def test_rows_that_train_the_same_model_train_it_once(mlflow_server, tmp_path):
    service = ServiceProcess(tmp_path, f"sqlite:///{tmp_path / 'jobs.db'}", mlflow_server.url)
    # no data folder: the quick profile's MNIST files are missing, so its training fails
    missing = str(tmp_path / "no-data")
    service.env |= {"CERTREPRO_MAX_ATTEMPTS": "1", "CERTREPRO_DATA": missing,
                    "CERTREPRO_MNIST_IDX": missing}
    service.start()
    try:
        client = service.client
        submitted = client.submit({"kind": "table", "spec": "ibp/figure3",
                                   "rows": TRAIN_01 + TRAIN_02, "profile": "smoke"})
        broken = client.submit({"kind": "table", "spec": "ibp/figure3",
                                "rows": TRAIN_01[:2], "profile": "quick"})
        by_name = {row["name"]: row for row in submitted["rows"]}
        trainer_id = by_name[TRAIN_01[0]]["id"]
        for name in TRAIN_01[1:]:  # queued behind the training row, and saying so
            row = by_name[name]
            assert row["trained_by"]["row_id"] == trainer_id and row["status"] == "queued"
            assert row["progress"]["waiting_for"]["row"] == TRAIN_01[0]
        assert by_name[TRAIN_02[0]]["trained_by"] is None  # trained at another eps_train

        job = finished(client, submitted["id"], timeout=300)
        assert job["status"] == "succeeded", job["rows"]
        rows = {row["name"]: row for row in job["rows"]}
        # exactly one training per trained model: two checkpoints for four rows
        runs = tmp_path / "runs" / job["id"]
        trained = {path.parent.name for path in runs.glob("*/checkpoint.pt")}
        assert trained == {rows[TRAIN_01[0]]["id"], rows[TRAIN_02[0]]["id"]}
        trainer = rows[TRAIN_01[0]]
        mlflow = MlflowClient(mlflow_server.url)
        for name, eps in zip(TRAIN_01[1:], (0.2, 0.3)):
            row = rows[name]
            result = row["result"]
            assert row["status"] == "succeeded" and row["attempts"] == 1
            assert result["config"]["eps"] == eps and result["config"]["eps_train"] == 0.1
            assert result["trained_by"]["row_id"] == trainer["id"]
            assert result["trained_by"]["row"] == TRAIN_01[0]
            assert result["timing"]["sec_per_epoch"] == trainer["result"]["timing"]["sec_per_epoch"]
            assert result["history"] == trainer["result"]["history"] and result["history"]
            assert result["timing"]["certify_sec"]["ibp"] >= 0
            assert result["checkpoint"] == trainer["result"]["checkpoint"]
            assert row["progress"]["epoch"] == row["progress"]["epochs"] == 1
            assert "waiting_for" not in row["progress"]
            run = mlflow.get_run(row["mlflow_run_id"])
            assert run.data.tags["certrepro.trained_by_run"] == trainer["mlflow_run_id"]
            assert run.data.tags["certrepro.trained_by_row"] == TRAIN_01[0]
            assert float(run.data.params["eps"]) == eps
            assert "verified_acc.ibp" in run.data.metrics and run.info.status == "FINISHED"
            curve = mlflow.get_metric_history(run.info.run_id, "sec_per_epoch")
            assert [m.value for m in curve] == trainer["result"]["timing"]["sec_per_epoch"]
        assert rows[TRAIN_01[0]]["result"]["config"]["eps"] == 0.1
        assert "trained_by" not in rows[TRAIN_01[0]]["result"]
        table = client.table(job["id"], "json")
        assert all(name in table for name in TRAIN_01 + TRAIN_02)

        broken = finished(client, broken["id"], timeout=120)
        first, second = broken["rows"]
        assert broken["status"] == "failed" and first["status"] == "failed"
        assert "DataNotFound" in first["error"]
        assert second["status"] == "failed" and second["attempts"] == 0  # never trained
        assert second["error"].startswith(f"not certified: row {TRAIN_01[0]}")
        assert first["id"] in second["error"] and "DataNotFound" in second["error"]
        assert not (tmp_path / "runs" / broken["id"] / second["id"]).exists()
        # the job's run is closed (with its table) once the job ended: nothing is left waiting
        wait_for(lambda: mlflow.get_run(broken["mlflow_run_id"]).info.status == "FAILED", 60,
                 "the failed job's MLflow run to close", 0.5)
    finally:
        service.stop()

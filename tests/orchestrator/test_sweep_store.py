"""The trials of a sweep job in the job store (SQLite and PostgreSQL): written by the dispatcher
that holds the sweep row's lease only, updated in place by trial id, shown with the job, and
cancelled with it."""
from __future__ import annotations

from orchestrator.store import JobStore, NewRow


def trial(trial_id: str, status: str, epoch: int = 1, **extra) -> dict:
    return {"trial_id": trial_id, "status": status, "params": {"optimizer.lr": 0.01},
            "metrics": {"clean_acc": 0.5}, "epoch": epoch, "final": False,
            "stopped_early": False, "mlflow_run_id": None, "error": None, **extra}


def test_trials_are_fenced_upserted_listed_and_cancelled(db_url):
    store = JobStore(db_url)
    try:
        job, _ = store.create_job("sweep", {"kind": "sweep"}, [NewRow("sweep", {"epochs": 2})])
        (row,) = store.claim_rows("me", lease_seconds=30, limit=1, max_attempts=3)
        assert not store.record_trials(row.id, "someone-else", [trial("t0", "running")])
        assert store.record_trials(row.id, "me", [trial("t0", "running"), trial("t1", "queued")])
        assert store.record_trials(row.id, "me", [
            trial("t0", "succeeded", epoch=2, final=True, mlflow_run_id="run0"),
            trial("t1", "running")])
        trials = store.get_job(job.id).trials
        assert [(t["trial_id"], t["status"], t["epoch"], t["final"]) for t in trials] == [
            ("t0", "succeeded", 2, True), ("t1", "running", 1, False)]
        assert trials[0]["mlflow_run_id"] == "run0" and trials[0]["params"] == {
            "optimizer.lr": 0.01}
        listed, _ = store.list_jobs(kind="sweep")
        assert [t["trial_id"] for t in listed[0].trials] == ["t0", "t1"]

        store.cancel_job(job.id)
        assert [t["trial_id"] for t in store.cancel_trials(job.id)] == ["t1"]
        assert [t["status"] for t in store.get_job(job.id).trials] == ["succeeded", "cancelled"]
        assert store.finish_cancelled(row.id, "me")
        assert store.get_job(job.id).status == "cancelled"
        # a run job has no trials
        run, _ = store.create_job("run", {"kind": "run"}, [NewRow("run", {"epochs": 1})])
        assert store.get_job(run.id).trials == []
    finally:
        store.close()

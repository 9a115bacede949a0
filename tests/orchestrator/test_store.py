"""The job store on both databases (SQLite file, PostgreSQL): schema, API side, dispatcher side."""
from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import make_url

from orchestrator import db
from orchestrator.store import (
    IdempotencyInProgress,
    IdempotencyMismatch,
    JobStore,
    JobView,
    NewRow,
    NotFound,
    RowView,
)

SHORT = 0.05  # a lease that expires during the test (seconds)
LONG = 60.0


@pytest.fixture
def store(db_url):
    s = JobStore(db_url)
    yield s
    s.close()


def rows_of(n: int, prefix: str = "row") -> list[NewRow]:
    return [NewRow(f"{prefix}-{i}", {"method": "ibp", "eps": 0.1 * i, "i": i}, seed=i)
            for i in range(n)]


def counts(store: JobStore) -> dict[str, int]:
    with store.engine.connect() as c:
        return {t: c.execute(sa.text(f"SELECT count(*) FROM {t}")).scalar_one()
                for t in ("jobs", "rows", "attempts", "idempotency_keys")}


def run_threads(n: int, fn) -> list:
    """fn(i) in n threads started together; returns results, re-raises the first error."""
    barrier = threading.Barrier(n)
    results: list = [None] * n
    errors: list[BaseException] = []

    def target(i):
        try:
            barrier.wait()
            results[i] = fn(i)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=target, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "threads hung"
    if errors:
        raise errors[0]
    return results


# --------------------------------------------------------------------------------------------
# Schema


def test_migrations_apply_to_empty_database_and_reapply_is_noop(db_url):
    engine = db.make_engine(db_url)
    try:
        assert db.current_revision(engine) is None
        assert sa.inspect(engine).get_table_names() == []
    finally:
        engine.dispose()

    store = JobStore(db_url)
    job, _ = store.create_job("run", {"kind": "run"}, rows_of(1))
    head = db.head_revision()
    assert head is not None
    assert db.current_revision(store.engine) == head
    assert {"jobs", "rows", "attempts", "idempotency_keys", "alembic_version"} <= set(
        sa.inspect(store.engine).get_table_names())
    store.close()

    again = JobStore(db_url)  # already at head: nothing to do, data kept
    try:
        assert db.current_revision(again.engine) == head
        assert again.get_job(job.id).id == job.id
        with again.engine.connect() as c:
            assert c.execute(sa.text("SELECT count(*) FROM alembic_version")).scalar_one() == 1
            # The migration builds exactly the schema of the models.
            diff = compare_metadata(MigrationContext.configure(c, opts={"compare_type": True}),
                                    db.Base.metadata)
        assert diff == []
    finally:
        again.close()


START_SCRIPT = """
import sys, time
import alembic.command, alembic.autogenerate, alembic.script  # warm: start together
from orchestrator.store import JobStore
start_at = float(sys.argv[2])
time.sleep(max(0.0, start_at - time.time()))
JobStore(sys.argv[1]).close()
"""


def test_concurrent_process_starts_on_an_empty_database(db_url):
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(root), *filter(None, [os.environ.get("PYTHONPATH")])])}
    start_at = time.time() + 1.5  # all three have imported by then
    procs = [subprocess.Popen([sys.executable, "-c", START_SCRIPT, db_url, str(start_at)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for _ in range(3)]
    outputs = [p.communicate(timeout=60)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], "\n".join(outputs)
    store = JobStore(db_url)
    try:
        assert db.current_revision(store.engine) == db.head_revision()
    finally:
        store.close()


def test_concurrent_thread_starts_on_an_empty_database(db_url):
    stores = run_threads(4, lambda i: JobStore(db_url))
    try:
        assert all(db.current_revision(s.engine) == db.head_revision() for s in stores)
        job, _ = stores[0].create_job("run", {}, rows_of(1))
        assert stores[3].get_job(job.id).id == job.id
    finally:
        for s in stores:
            s.close()


def test_engine_settings(db_url):
    store = JobStore(db_url)
    try:
        assert store.ping()
        if store.dialect == "sqlite":
            assert make_url(db_url).database and store.url == db_url
            with store.engine.connect() as c:
                assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
                assert c.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
                assert c.exec_driver_sql("PRAGMA busy_timeout").scalar() == 10000
        else:
            assert store.dialect == "postgresql"
            plain = db_url.replace("postgresql+psycopg://", "postgresql://")
            other = JobStore(plain)  # the driver-less form is rewritten to psycopg
            try:
                assert other.url.startswith("postgresql+psycopg://")
                assert other.engine.dialect.driver == "psycopg"
                assert other.ping()
            finally:
                other.close()
    finally:
        store.close()


def test_sqlite_parent_folder_is_created(tmp_path):
    path = tmp_path / "a" / "b" / "jobs.db"
    store = JobStore(f"sqlite:///{path}")
    try:
        assert path.exists()
        assert store.dialect == "sqlite"
    finally:
        store.close()


def test_in_memory_sqlite_for_unit_tests():
    store = JobStore("sqlite://")
    try:
        job, _ = store.create_job("run", {}, rows_of(2))
        assert [r.index for r in store.claim_rows("o", lease_seconds=LONG, limit=5,
                                                  max_attempts=1)] == [0, 1]
        assert store.get_job(job.id).status == "running"
    finally:
        store.close()


# --------------------------------------------------------------------------------------------
# API side


def test_create_and_get_round_trip(store):
    body = {"kind": "table", "spec": "ibp/table4", "profile": "quick", "seeds": [0, 1],
            "nested": {"a": [1, 2.5, None, True, "x"]}}
    rows = [NewRow("mnist-eps0.1-ibp", {"method": "ibp", "eps": 0.1, "certifiers": ["ibp"],
                                        "schedule": {"ramp": [10, 50]}}, seed=1),
            NewRow("mnist-eps0.3-ibp", {"method": "ibp", "eps": 0.3}, seed=2)]
    before = datetime.now(timezone.utc)
    job, created = store.create_job("table", body, rows, spec="ibp/table4", profile="quick")
    assert created
    assert isinstance(job, JobView) and all(isinstance(r, RowView) for r in job.rows)
    got = store.get_job(job.id)
    assert got == job
    assert len(got.id) == 32 and got.kind == "table" and got.status == "queued"
    assert got.spec == "ibp/table4" and got.profile == "quick" and got.body == body
    assert got.cancel_requested is False and got.error is None and got.mlflow_run_id is None
    created_at = datetime.fromisoformat(got.created_at)
    assert created_at.tzinfo is not None and created_at.utcoffset().total_seconds() == 0
    assert before <= created_at <= datetime.now(timezone.utc)
    assert [r.index for r in got.rows] == [0, 1]
    assert [r.name for r in got.rows] == ["mnist-eps0.1-ibp", "mnist-eps0.3-ibp"]
    assert [r.seed for r in got.rows] == [1, 2]
    assert got.rows[0].config == rows[0].config and got.rows[1].config == rows[1].config
    r0 = got.rows[0]
    assert (r0.status, r0.attempts, r0.progress, r0.metrics, r0.result) == (
        "queued", 0, {"epoch": 0, "epochs": 0}, {}, None)
    assert r0.job_id == job.id and r0.lease_owner is None and r0.attempt_log == []
    d = got.to_dict()
    assert d["rows"][0]["config"]["schedule"] == {"ramp": [10, 50]}
    assert d["rows"][1]["progress"] == {"epoch": 0, "epochs": 0}
    import json
    json.dumps(d)  # JSON-ready


def test_create_validates_input_and_writes_nothing(store):
    before = counts(store)
    with pytest.raises(ValueError, match="kind"):
        store.create_job("nope", {}, rows_of(1))
    with pytest.raises(ValueError, match="row"):
        store.create_job("run", {}, [])
    with pytest.raises(ValueError, match="JSON"):
        store.create_job("run", {}, [NewRow("r", {"x": {1, 2}})])
    with pytest.raises(ValueError, match="JSON"):
        store.create_job("run", {"x": object()}, rows_of(1))
    assert counts(store) == before


def test_failed_create_leaves_store_unchanged(store, monkeypatch):
    store.create_job("run", {"n": 0}, rows_of(1), idempotency_key="k0")
    before = counts(store)

    original = JobStore._insert_rows

    def broken(s, job_id, rows, now):
        original(s, job_id, rows[:1], now)  # the first row is written, then the write fails
        raise RuntimeError("disk full")

    monkeypatch.setattr(JobStore, "_insert_rows", staticmethod(broken))
    with pytest.raises(RuntimeError, match="disk full"):
        store.create_job("table", {"n": 1}, rows_of(3), idempotency_key="k1")
    assert counts(store) == before
    monkeypatch.undo()

    with pytest.raises(IdempotencyMismatch):
        store.create_job("run", {"n": 999}, rows_of(1), idempotency_key="k0")
    assert counts(store) == before

    job, created = store.create_job("table", {"n": 1}, rows_of(3), idempotency_key="k1")
    assert created and len(job.rows) == 3  # the key was not left behind by the failed create


def test_list_jobs_order_filters_and_pagination(store):
    made = []
    for i in range(7):
        kind = "table" if i % 2 else "run"
        made.append(store.create_job(kind, {"i": i}, rows_of(1))[0])
    cancelled = store.cancel_job(made[2].id)
    assert cancelled.status == "cancelled"
    newest_first = [j.id for j in sorted(made, key=lambda j: (j.created_at, j.id), reverse=True)]
    assert newest_first[0] == made[-1].id

    pages, cursor, seen = [], None, []
    for _ in range(5):
        page, cursor = store.list_jobs(limit=3, cursor=cursor)
        pages.append(len(page))
        seen += [j.id for j in page]
        if cursor is None:
            break
    assert pages == [3, 3, 1]
    assert seen == newest_first
    assert cursor is None

    page, nxt = store.list_jobs(limit=7)
    assert [j.id for j in page] == newest_first and nxt is None
    assert len(page[0].rows) == 1

    runs, _ = store.list_jobs(kind="run", limit=100)
    assert [j.id for j in runs] == [i for i in newest_first
                                    if i in {m.id for m in made if m.kind == "run"}]
    assert {j.kind for j in runs} == {"run"} and len(runs) == 4
    done, _ = store.list_jobs(status="cancelled")
    assert [j.id for j in done] == [made[2].id]
    queued_tables, _ = store.list_jobs(status="queued", kind="table", limit=2)
    assert len(queued_tables) == 2 and all(j.kind == "table" for j in queued_tables)

    for bad in ["garbage!", "bm90IGpzb24", "W10", "WyJ4IiwgInkiXQ", "e30", "", "====",
                "WyIyMDI0LTAxLTAxVDAwOjAwOjAwIiwgImEiXQ"]:  # last: a naive timestamp
        if bad == "":
            store.list_jobs(cursor=bad)  # empty cursor: the first page
            continue
        with pytest.raises(ValueError, match="invalid cursor"):
            store.list_jobs(cursor=bad)
    with pytest.raises(ValueError):
        store.list_jobs(status="exploded")
    with pytest.raises(ValueError):
        store.list_jobs(limit=0)


def test_idempotency_same_body_same_job_different_body_mismatch(store):
    body = {"kind": "run", "config": {"method": "ibp", "eps": 0.1}}
    first, created = store.create_job("run", body, rows_of(1), idempotency_key="key-1")
    assert created
    # Key order does not matter: the hash is of the canonical JSON.
    same = {"config": {"eps": 0.1, "method": "ibp"}, "kind": "run"}
    second, created2 = store.create_job("run", same, rows_of(1), idempotency_key="key-1")
    assert not created2 and second.id == first.id
    before = counts(store)
    with pytest.raises(IdempotencyMismatch):
        store.create_job("run", {**body, "config": {"eps": 0.3}}, rows_of(1),
                         idempotency_key="key-1")
    assert counts(store) == before
    other, created3 = store.create_job("run", body, rows_of(1), idempotency_key="key-2")
    assert created3 and other.id != first.id
    assert counts(store)["jobs"] == 2 and counts(store)["idempotency_keys"] == 2


def test_idempotency_concurrent_requests_make_one_job(store):
    body = {"kind": "table", "spec": "bcp/table2"}
    results = run_threads(8, lambda i: store.create_job(
        "table", body, rows_of(3), spec="bcp/table2", idempotency_key="same-key"))
    ids = {job.id for job, _ in results}
    assert len(ids) == 1
    assert sum(created for _, created in results) == 1
    assert counts(store) == {"jobs": 1, "rows": 3, "attempts": 0, "idempotency_keys": 1}


def test_idempotency_key_held_by_uncommitted_transaction(store):
    store.idempotency_wait_seconds = 0.3
    body = {"kind": "run"}
    if store.dialect == "postgresql":
        import psycopg

        url = make_url(store.url).set(drivername="postgresql")
        holder = psycopg.connect(url.render_as_string(hide_password=False))
        holder.execute("INSERT INTO idempotency_keys (key, body_hash, job_id, created_at) "
                       "VALUES ('held', 'x', 'y', now())")  # a transaction, not committed
    else:
        holder = sqlite3.connect(make_url(store.url).database, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # another writer holds the write lock
    try:
        t0 = time.monotonic()
        with pytest.raises(IdempotencyInProgress):
            store.create_job("run", body, rows_of(1), idempotency_key="held")
        waited = time.monotonic() - t0
        assert 0.25 <= waited < 5
    finally:
        holder.rollback()
        holder.close()
    job, created = store.create_job("run", body, rows_of(1), idempotency_key="held")
    assert created and counts(store)["jobs"] == 1


def test_not_found_for_unknown_ids(store):
    for call in (lambda: store.get_job("nope"), lambda: store.cancel_job("nope"),
                 lambda: store.set_job_mlflow_run("nope", "run"), lambda: store.get_row("nope")):
        with pytest.raises(NotFound):
            call()
    assert store.renew_lease("nope", "o", 10) is False
    assert store.record_progress("nope", "o", epoch=1, epochs=2, metrics={}) is False
    assert store.complete_row("nope", "o", {}) is False
    assert store.fail_row("nope", "o", "x", max_attempts=3) is None
    assert store.finish_cancelled("nope", "o") is False
    assert store.release("nope", "o") is False


# --------------------------------------------------------------------------------------------
# Dispatcher side


def test_claim_order_and_lease(store):
    old, _ = store.create_job("table", {"n": 1}, rows_of(3, "old"))
    new, _ = store.create_job("table", {"n": 2}, rows_of(2, "new"))
    t0 = datetime.now(timezone.utc)
    first = store.claim_rows("o1", lease_seconds=LONG, limit=4, max_attempts=3)
    assert [r.name for r in first] == ["old-0", "old-1", "old-2", "new-0"]
    for r in first:
        assert r.status == "running" and r.lease_owner == "o1" and r.attempts == 1
        assert (datetime.fromisoformat(r.lease_until) - t0).total_seconds() >= LONG - 1
        assert [(a.number, a.owner, a.outcome, a.ended_at) for a in r.attempt_log] == [
            (1, "o1", None, None)]
    assert store.get_job(old.id).status == "running"
    assert store.get_job(new.id).status == "running"  # one row running, one waiting
    # Leases that have not expired are not taken over.
    assert [r.name for r in store.claim_rows("o2", lease_seconds=LONG, limit=9,
                                             max_attempts=3)] == ["new-1"]
    assert store.claim_rows("o3", lease_seconds=LONG, limit=9, max_attempts=3) == []
    assert store.claim_rows("o3", lease_seconds=LONG, limit=0, max_attempts=3) == []


def test_concurrent_claims_never_share_a_row(store):
    job_a, _ = store.create_job("table", {"a": 1}, rows_of(12, "a"))
    job_b, _ = store.create_job("table", {"b": 1}, rows_of(8, "b"))

    def worker(i):
        got = []
        while True:
            rows = store.claim_rows(f"owner-{i}", lease_seconds=LONG, limit=3, max_attempts=3)
            if not rows:
                return got
            assert all(r.lease_owner == f"owner-{i}" for r in rows)
            got += [r.id for r in rows]

    claimed = [rid for got in run_threads(4, worker) for rid in got]
    all_ids = [r.id for j in (job_a, job_b) for r in store.get_job(j.id).rows]
    assert sorted(claimed) == sorted(all_ids)  # each row exactly once
    for j in (job_a, job_b):
        for r in store.get_job(j.id).rows:
            assert r.attempts == 1 and len(r.attempt_log) == 1 and r.status == "running"
    assert counts(store)["attempts"] == 20


def test_lease_expiry_recovery_and_fencing(store):
    job, _ = store.create_job("run", {}, rows_of(1))
    [row] = store.claim_rows("old", lease_seconds=SHORT, limit=1, max_attempts=3)
    assert store.record_progress(row.id, "old", epoch=1, epochs=10, metrics={"loss": 1.0})
    time.sleep(SHORT * 2)
    [again] = store.claim_rows("new", lease_seconds=LONG, limit=5, max_attempts=3)
    assert again.id == row.id and again.lease_owner == "new" and again.attempts == 2
    log = again.attempt_log
    assert [(a.number, a.owner, a.outcome) for a in log] == [(1, "old", "lost"), (2, "new", None)]
    assert log[0].ended_at is not None and log[1].ended_at is None
    assert "expired" in log[0].error

    # The old owner is fenced out of every write.
    assert store.record_progress(row.id, "old", epoch=9, epochs=10, metrics={"loss": 9}) is False
    assert store.complete_row(row.id, "old", {"metrics": {"clean_acc": 0.1}}) is False
    assert store.renew_lease(row.id, "old", LONG) is False
    assert store.fail_row(row.id, "old", "late", max_attempts=3) is None
    assert store.finish_cancelled(row.id, "old") is False
    assert store.release(row.id, "old") is False
    now = store.get_row(row.id)
    assert (now.status, now.lease_owner, now.result, now.error) == ("running", "new", None, None)
    assert now.progress == {"epoch": 1, "epochs": 10}  # the old owner's late progress was refused

    assert store.complete_row(row.id, "new", {"metrics": {"clean_acc": 0.9}})
    done = store.get_job(job.id)
    assert done.status == "succeeded"
    assert [a.outcome for a in done.rows[0].attempt_log] == ["lost", "succeeded"]


def test_lost_too_often_becomes_failed(store):
    job, _ = store.create_job("table", {}, rows_of(2))
    store.claim_rows("a", lease_seconds=SHORT, limit=1, max_attempts=2)
    time.sleep(SHORT * 2)
    [r] = store.claim_rows("b", lease_seconds=SHORT, limit=1, max_attempts=2)
    assert r.attempts == 2 and r.index == 0
    time.sleep(SHORT * 2)
    # Row 0 used its two attempts: failed instead of claimed; row 1 is claimed in its place.
    claimed = store.claim_rows("c", lease_seconds=LONG, limit=1, max_attempts=2)
    assert [x.index for x in claimed] == [1]
    failed = store.get_job(job.id).rows[0]
    assert failed.status == "failed" and failed.attempts == 2
    assert "lost" in failed.error and "2 times" in failed.error
    assert [a.outcome for a in failed.attempt_log] == ["lost", "lost"]
    assert failed.lease_owner is None
    assert store.complete_row(claimed[0].id, "c", {"metrics": {}})
    final = store.get_job(job.id)
    assert final.status == "failed" and final.error == failed.error


def test_fail_row_retry_then_success(store):
    job, _ = store.create_job("run", {}, rows_of(1))
    [r] = store.claim_rows("o", lease_seconds=LONG, limit=1, max_attempts=3)
    assert store.fail_row(r.id, "o", "CUDA out of memory", max_attempts=3) == "queued"
    queued = store.get_job(job.id)
    assert queued.status == "queued" and queued.rows[0].status == "queued"
    assert queued.rows[0].error == "CUDA out of memory"
    assert [(a.outcome, a.error) for a in queued.rows[0].attempt_log] == [
        ("failed", "CUDA out of memory")]
    [r2] = store.claim_rows("o", lease_seconds=LONG, limit=1, max_attempts=3)
    assert r2.id == r.id and r2.attempts == 2
    assert store.record_progress(r.id, "o", epoch=3, epochs=5, metrics={"loss": 0.5},
                                 mlflow_run_id="mlf-1")
    result = {"metrics": {"clean_acc": 0.98, "verified_acc": {"ibp": 0.9}}, "checkpoint": "c.pt"}
    assert store.complete_row(r.id, "o", result)
    done = store.get_job(job.id)
    row = done.rows[0]
    assert done.status == "succeeded" and done.error is None
    assert (row.status, row.error, row.mlflow_run_id) == ("succeeded", None, "mlf-1")
    assert row.metrics == result["metrics"] and row.result == result
    assert row.progress == {"epoch": 5, "epochs": 5}
    assert [a.outcome for a in row.attempt_log] == ["failed", "succeeded"]


def test_fail_row_out_of_attempts(store):
    job, _ = store.create_job("run", {}, rows_of(1))
    for attempt in (1, 2):
        [r] = store.claim_rows("o", lease_seconds=LONG, limit=1, max_attempts=2)
        assert r.attempts == attempt
        status = store.fail_row(r.id, "o", f"boom {attempt}", max_attempts=2)
        assert status == ("queued" if attempt == 1 else "failed")
    final = store.get_job(job.id)
    assert final.status == "failed" and final.error == "boom 2"
    assert store.claim_rows("o", lease_seconds=LONG, limit=1, max_attempts=5) == []


def test_completed_rows_are_never_claimed_again(store):
    job, _ = store.create_job("table", {}, rows_of(3))
    rows = store.claim_rows("o", lease_seconds=SHORT, limit=3, max_attempts=3)
    assert store.complete_row(rows[0].id, "o", {"metrics": {"a": 1}})
    assert store.fail_row(rows[1].id, "o", "bad", max_attempts=1) == "failed"
    store.cancel_job(job.id)
    assert store.finish_cancelled(rows[2].id, "o")
    time.sleep(SHORT * 2)  # their leases would have expired, had they kept them
    assert store.claim_rows("p", lease_seconds=LONG, limit=10, max_attempts=10) == []
    # And a completed row cannot be completed twice, by anyone.
    assert store.complete_row(rows[0].id, "o", {"metrics": {"a": 2}}) is False
    assert store.get_row(rows[0].id).metrics == {"a": 1}
    assert counts(store)["attempts"] == 3


def test_cancel_queued_and_running_rows(store):
    job, _ = store.create_job("table", {}, rows_of(3))
    other, _ = store.create_job("table", {}, rows_of(1, "other"))
    [running] = store.claim_rows("o1", lease_seconds=LONG, limit=1, max_attempts=3)
    assert running.job_id == job.id
    assert store.rows_to_stop("o1") == []

    cancelled = store.cancel_job(job.id)
    assert cancelled.cancel_requested
    assert [r.status for r in cancelled.rows] == ["running", "cancelled", "cancelled"]
    assert cancelled.status == "running"  # a row still runs until the dispatcher stops it
    assert store.rows_to_stop("o1") == [running.id]
    assert store.rows_to_stop("o2") == []
    # Rows of a cancelled job are never claimed; other jobs still are.
    assert [r.job_id for r in store.claim_rows("o2", lease_seconds=LONG, limit=5,
                                               max_attempts=3)] == [other.id]

    assert store.finish_cancelled(running.id, "o1")
    final = store.get_job(job.id)
    assert final.status == "cancelled" and final.cancel_requested
    assert [r.status for r in final.rows] == ["cancelled"] * 3
    assert [a.outcome for a in final.rows[0].attempt_log] == ["cancelled"]
    assert store.rows_to_stop("o1") == []

    # Cancelling a finished job is a no-op.
    assert store.cancel_job(job.id) == final
    [o] = store.get_job(other.id).rows
    assert store.complete_row(o.id, "o2", {"metrics": {}})
    finished = store.get_job(other.id)
    assert finished.status == "succeeded"
    again = store.cancel_job(other.id)
    assert again == finished and not again.cancel_requested


def test_cancel_all_queued_job_is_cancelled_at_once(store):
    job, _ = store.create_job("table", {}, rows_of(4))
    view = store.cancel_job(job.id)
    assert view.status == "cancelled"
    assert {r.status for r in view.rows} == {"cancelled"}
    assert store.claim_rows("o", lease_seconds=LONG, limit=10, max_attempts=3) == []


def test_cancel_while_running_then_row_fails_or_lease_expires(store):
    job, _ = store.create_job("table", {}, rows_of(2))
    a, b = store.claim_rows("o", lease_seconds=SHORT, limit=2, max_attempts=3)
    store.renew_lease(a.id, "o", LONG)
    store.cancel_job(job.id)
    # A failure after the cancel is not retried.
    assert store.fail_row(a.id, "o", "interrupted", max_attempts=3) == "cancelled"
    time.sleep(SHORT * 2)
    # b's owner died: the expired row of a cancelled job ends as cancelled, not claimed.
    assert store.claim_rows("p", lease_seconds=LONG, limit=5, max_attempts=3) == []
    final = store.get_job(job.id)
    assert final.status == "cancelled"
    assert [r.status for r in final.rows] == ["cancelled", "cancelled"]
    assert final.rows[1].attempt_log[0].outcome == "lost"


def test_job_status_for_mixed_outcomes(store):
    job, _ = store.create_job("table", {}, rows_of(3))
    assert store.get_job(job.id).status == "queued"
    [r0] = store.claim_rows("o", lease_seconds=LONG, limit=1, max_attempts=3)
    assert store.get_job(job.id).status == "running"
    assert store.complete_row(r0.id, "o", {"metrics": {}})
    assert store.get_job(job.id).status == "running"  # one done, two waiting
    r1, r2 = store.claim_rows("o", lease_seconds=LONG, limit=5, max_attempts=3)
    assert store.fail_row(r1.id, "o", "diverged", max_attempts=1) == "failed"
    mid = store.get_job(job.id)
    assert mid.status == "running" and mid.error is None  # r2 still runs
    assert store.complete_row(r2.id, "o", {"metrics": {}})
    final = store.get_job(job.id)
    assert final.status == "failed" and final.error == "diverged"
    assert [r.status for r in final.rows] == ["succeeded", "failed", "succeeded"]

    ok, _ = store.create_job("table", {}, rows_of(2))
    for r in store.claim_rows("o", lease_seconds=LONG, limit=5, max_attempts=3):
        assert store.complete_row(r.id, "o", {"metrics": {}})
    assert store.get_job(ok.id).status == "succeeded"


def test_concurrent_completion_of_last_rows_finishes_the_job(store):
    for _ in range(3):
        job, _ = store.create_job("table", {}, rows_of(4))
        rows = store.claim_rows("o", lease_seconds=LONG, limit=4, max_attempts=3)
        assert all(run_threads(4, lambda i: store.complete_row(rows[i].id, "o", {"metrics": {}})))
        assert store.get_job(job.id).status == "succeeded"


def test_progress_lease_renewal_release_and_mlflow(store):
    job, _ = store.create_job("run", {}, rows_of(1))
    [r] = store.claim_rows("o", lease_seconds=1, limit=1, max_attempts=1)
    before = store.get_job(job.id)
    assert store.renew_lease(r.id, "o", LONG)
    renewed = store.get_row(r.id)
    assert datetime.fromisoformat(renewed.lease_until) > datetime.fromisoformat(r.lease_until)
    assert store.record_progress(r.id, "o", epoch=2, epochs=8, metrics={"loss": 0.3, "acc": 0.7},
                                 mlflow_run_id="abc")
    assert store.record_progress(r.id, "o", epoch=3, epochs=8, metrics={"loss": 0.2})
    row = store.get_row(r.id)
    assert row.progress == {"epoch": 3, "epochs": 8}
    assert row.metrics == {"loss": 0.2} and row.mlflow_run_id == "abc"
    assert store.get_job(job.id).updated_at > before.updated_at

    store.set_job_mlflow_run(job.id, "parent-run")
    assert store.get_job(job.id).mlflow_run_id == "parent-run"

    # A clean shutdown gives the row back without a failure; it can be claimed again even at
    # max_attempts=1.
    assert store.release(r.id, "o")
    back = store.get_job(job.id)
    assert back.status == "queued" and back.rows[0].status == "queued"
    assert back.rows[0].lease_owner is None and back.rows[0].attempts == 1
    assert [a.outcome for a in back.rows[0].attempt_log] == ["lost"]
    assert store.release(r.id, "o") is False
    [again] = store.claim_rows("p", lease_seconds=LONG, limit=1, max_attempts=1)
    assert again.id == r.id and again.attempts == 2 and again.lease_owner == "p"

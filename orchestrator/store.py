"""The job store: the durable queue of the service (SQLite embedded, PostgreSQL in a cluster).

The API side creates, lists and cancels jobs; the dispatcher side claims due rows under a lease,
reports progress, and completes, fails, cancels or releases them. Every method runs in one short
transaction of its own and returns plain dataclasses (``JobView``, ``RowView``, ``AttemptView``),
never ORM objects.

Dispatcher writes are *fenced*: they apply only while the row is still ``running`` under the
caller's ``owner``; a dispatcher whose lease expired and was taken over gets ``False`` / ``None``
and cannot overwrite the new owner's work.

Locking (PostgreSQL, READ COMMITTED): a transaction locks the rows it changes first and the job
after (``SELECT ... FOR UPDATE``; jobs in id order when several), then recomputes the job status
from a fresh read of its rows, so two transactions finishing the last two rows of one job cannot
both see the other row still running. Claims use ``FOR UPDATE SKIP LOCKED``, so concurrent
dispatchers never take the same row. On SQLite every write transaction starts with
``BEGIN IMMEDIATE`` and so runs alone.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import threading
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any, Iterator

import sqlalchemy as sa
from sqlalchemy import and_, or_, select, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, aliased, selectinload

from orchestrator.db import (
    JOB_KINDS,
    OPT_BUSY_MS,
    STATUSES,
    TERMINAL,
    Attempt,
    IdempotencyKey,
    Job,
    Row,
    SweepTrial,
    make_engine,
    new_id,
    normalize_url,
    read_only,
    upgrade,
    utcnow,
)

__all__ = [
    "AttemptView", "IdempotencyInProgress", "IdempotencyMismatch", "JobStore", "JobView",
    "NewRow", "NotFound", "RowView", "StoreError",
]


# --------------------------------------------------------------------------------------------
# Views


@dataclass
class NewRow:
    name: str
    config: dict
    seed: int = 0
    # index (in the job's row list) of an earlier row that trains this row's model; this row
    # then only certifies that row's checkpoint (orchestrator.shared_training)
    trained_by: int | None = None


@dataclass
class AttemptView:
    number: int
    owner: str
    started_at: str
    ended_at: str | None
    outcome: str | None
    error: str | None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RowView:
    id: str
    job_id: str
    index: int
    name: str
    seed: int
    config: dict
    status: str
    attempts: int
    progress: dict
    metrics: dict
    result: dict | None
    mlflow_run_id: str | None
    error: str | None
    lease_owner: str | None
    lease_until: str | None
    attempt_log: list[AttemptView] = field(default_factory=list)
    # {"row_id", "row", "seed"} of the row that trains this row's model; None: it trains itself
    trained_by: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class JobView:
    id: str
    kind: str
    status: str
    spec: str | None
    profile: str | None
    body: dict
    cancel_requested: bool
    mlflow_run_id: str | None
    error: str | None
    created_at: str
    updated_at: str
    rows: list[RowView] = field(default_factory=list)
    trials: list[dict] = field(default_factory=list)  # a sweep job's trials (TRIAL_FIELDS)

    def to_dict(self) -> dict:
        return asdict(self)


# What a sweep trial record holds (the dispatcher writes them from the sweep's state file).
TRIAL_FIELDS = ("trial_id", "status", "params", "metrics", "epoch", "final", "stopped_early",
                "mlflow_run_id", "error")
TRIAL_TERMINAL = frozenset({"succeeded", "stopped", "failed", "cancelled"})


class StoreError(Exception):
    pass


class IdempotencyMismatch(StoreError):
    """The idempotency key was used before with a different body."""


class IdempotencyInProgress(StoreError):
    """Another request with this idempotency key is still being written; retry shortly."""


class NotFound(StoreError):
    pass


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _attempt_view(a: Attempt) -> AttemptView:
    return AttemptView(number=a.number, owner=a.owner, started_at=_iso(a.started_at),
                       ended_at=_iso(a.ended_at), outcome=a.outcome, error=a.error)


def _row_view(r: Row, trainer: Row | None = None) -> RowView:
    """`trainer`: the row named by r.trained_by (its name and status go into the view)."""
    progress = {"epoch": r.progress_epoch, "epochs": r.progress_epochs}
    trained_by = None
    if r.trained_by is not None:
        trained_by = {"row_id": r.trained_by, "row": trainer.name if trainer else None,
                      "seed": trainer.seed if trainer else None}
        if r.status == "queued" and trainer is not None and trainer.status != "succeeded":
            progress["waiting_for"] = trained_by
            progress["note"] = f"waiting for row {trainer.name}'s training ({trainer.status})"
    return RowView(
        id=r.id, job_id=r.job_id, index=r.index, name=r.name, seed=r.seed, config=r.config,
        status=r.status, attempts=r.attempts, progress=progress,
        metrics=r.metrics if r.metrics is not None else {}, result=r.result,
        mlflow_run_id=r.mlflow_run_id, error=r.error, lease_owner=r.lease_owner,
        lease_until=_iso(r.lease_until), attempt_log=[_attempt_view(a) for a in r.attempt_log],
        trained_by=trained_by,
    )


def _single_row_view(s: Session, r: Row) -> RowView:
    return _row_view(r, s.get(Row, r.trained_by) if r.trained_by is not None else None)


def _trial_dict(t: SweepTrial) -> dict:
    return {name: getattr(t, name) for name in TRIAL_FIELDS} | {"updated_at": _iso(t.updated_at)}


def _job_view(j: Job) -> JobView:
    by_id = {r.id: r for r in j.rows}
    return JobView(
        id=j.id, kind=j.kind, status=j.status, spec=j.spec, profile=j.profile, body=j.body,
        cancel_requested=bool(j.cancel_requested), mlflow_run_id=j.mlflow_run_id, error=j.error,
        created_at=_iso(j.created_at), updated_at=_iso(j.updated_at),
        rows=[_row_view(r, by_id.get(r.trained_by)) for r in j.rows],
        trials=[_trial_dict(t) for t in j.trials],
    )


def _canonical_json(value: Any, what: str) -> str:
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} is not JSON-serializable: {e}") from None


def body_hash(body: dict) -> str:
    """sha256 of the canonical JSON (sorted keys) of a request body."""
    return hashlib.sha256(_canonical_json(body, "body").encode()).hexdigest()


def _encode_cursor(created_at: datetime, job_id: str) -> str:
    raw = json.dumps([created_at.isoformat(), job_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        created, job_id = json.loads(base64.b64decode(padded, altchars=b"-_", validate=True))
        if not isinstance(created, str) or not isinstance(job_id, str):
            raise ValueError
        created_at = datetime.fromisoformat(created)
        if created_at.tzinfo is None:
            raise ValueError
        return created_at, job_id
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
        raise ValueError("invalid cursor") from None


def _is_lock_timeout(error: OperationalError, dialect: str) -> bool:
    if dialect == "postgresql":
        return getattr(error.orig, "sqlstate", None) == "55P03"  # lock_not_available
    return "locked" in str(error.orig).lower()  # sqlite: database is locked / busy


# --------------------------------------------------------------------------------------------
# Store


class JobStore:
    """The job store on a SQLAlchemy URL; applies ``alembic upgrade head`` when it starts."""

    #: How long a create with an idempotency key waits for another transaction holding the same
    #: key (PostgreSQL) or the write lock (SQLite) before raising ``IdempotencyInProgress``.
    idempotency_wait_seconds: float = 2.0

    def __init__(self, url: str, *, echo: bool = False):
        self.url = normalize_url(url)
        self._engine = make_engine(self.url, echo=echo)
        self.dialect: str = self._engine.dialect.name
        self._reader = read_only(self._engine)
        self._write_lock = threading.Lock() if self.dialect == "sqlite" else nullcontext()
        try:
            upgrade(self._engine)
        except BaseException:
            self._engine.dispose()
            raise

    @property
    def engine(self) -> sa.Engine:
        return self._engine

    def close(self) -> None:
        self._engine.dispose()

    def ping(self) -> bool:
        try:
            with self._engine.connect() as conn:
                return conn.execute(sa.text("SELECT 1")).scalar() == 1
        except Exception:
            return False

    # -- sessions --------------------------------------------------------------------------

    @contextmanager
    def _write(self, engine: sa.Engine | None = None) -> Iterator[Session]:
        # SQLite has one writer at a time; threads of this process queue on a lock instead of
        # sleep-polling the database's busy timeout (which starves some of them for seconds).
        with self._write_lock, Session(engine or self._engine) as s, s.begin():
            yield s

    @contextmanager
    def _read(self) -> Iterator[Session]:
        with Session(self._reader) as s, s.begin():
            yield s

    @staticmethod
    def _load_job(s: Session, job_id: str) -> Job | None:
        return s.execute(
            select(Job).where(Job.id == job_id)
            .options(selectinload(Job.rows).selectinload(Row.attempt_log),
                     selectinload(Job.trials))
            .execution_options(populate_existing=True)
        ).scalar_one_or_none()

    @staticmethod
    def _lock_job(s: Session, job_id: str) -> Job:
        return s.execute(
            select(Job).where(Job.id == job_id).with_for_update()
            .execution_options(populate_existing=True)
        ).scalar_one()

    @staticmethod
    def _recompute(s: Session, job: Job, now: datetime) -> None:
        """Job status from its rows (call with the job locked, after the row changes)."""
        rows = s.execute(
            select(Row.status, Row.error).where(Row.job_id == job.id).order_by(Row.index)
        ).all()
        statuses = [r.status for r in rows]
        running = "running" in statuses
        error = None
        if job.cancel_requested and not running:
            status = "cancelled"
        elif statuses and all(st == "succeeded" for st in statuses):
            status = "succeeded"
        elif statuses and all(st in TERMINAL for st in statuses):
            failed = [r for r in rows if r.status == "failed"]
            if failed:
                status, error = "failed", failed[0].error
            else:
                status = "cancelled"
        elif running or any(st in TERMINAL for st in statuses):
            status = "running"
        else:
            status = "queued"
        job.status = status
        job.error = error
        job.updated_at = now

    def _fenced_row(self, s: Session, row_id: str, owner: str) -> Row | None:
        return s.execute(
            select(Row).where(Row.id == row_id, Row.status == "running",
                              Row.lease_owner == owner)
            .with_for_update().execution_options(populate_existing=True)
        ).scalar_one_or_none()

    @staticmethod
    def _close_attempt(s: Session, row_id: str, now: datetime, outcome: str,
                       error: str | None = None) -> None:
        s.execute(
            update(Attempt).where(Attempt.row_id == row_id, Attempt.ended_at.is_(None))
            .values(ended_at=now, outcome=outcome, error=error)
            .execution_options(synchronize_session=False)
        )

    # -- API side --------------------------------------------------------------------------

    def create_job(self, kind: str, body: dict, rows: list[NewRow], *, spec: str | None = None,
                   profile: str | None = None,
                   idempotency_key: str | None = None) -> tuple[JobView, bool]:
        """Write the job and all its rows (and the idempotency key) in one transaction.

        Returns ``(job, created)``; ``created`` is False when ``idempotency_key`` was already
        used with the same body (the first job is returned).
        """
        if kind not in JOB_KINDS:
            raise ValueError(f"unknown job kind {kind!r}; known: {', '.join(JOB_KINDS)}")
        if not rows:
            raise ValueError("a job needs at least one row")
        rows = list(rows)
        for i, row in enumerate(rows):
            if not isinstance(row, NewRow):
                raise TypeError(f"rows[{i}] is {type(row).__name__}, not NewRow")
            _canonical_json(row.config, f"config of row {row.name!r}")
            _check_trainer(rows, i)
        digest = body_hash(body)  # also checks that the body is JSON
        if idempotency_key is None:
            with self._write() as s:
                return self._insert_job(s, kind, body, rows, spec, profile), True
        if not isinstance(idempotency_key, str) or not 0 < len(idempotency_key) <= 255:
            raise ValueError("an idempotency key is a string of 1 to 255 characters")
        try:
            return self._create_keyed(kind, body, rows, spec, profile, idempotency_key, digest)
        except IntegrityError:
            # PostgreSQL: our insert waited on the unique index for a concurrent transaction
            # with the same key, which committed first. Its job is the answer.
            found = self._lookup_key(idempotency_key, digest)
            if found is None:
                raise
            return found, False

    def _create_keyed(self, kind, body, rows, spec, profile, key, digest):
        wait_ms = max(1, int(self.idempotency_wait_seconds * 1000))
        engine = self._engine
        if self.dialect == "sqlite":
            engine = engine.execution_options(**{OPT_BUSY_MS: wait_ms})
        try:
            with self._write(engine) as s:
                existing = s.get(IdempotencyKey, key)
                if existing is not None:
                    return self._answer_existing(s, existing, key, digest), False
                if self.dialect == "postgresql":
                    s.execute(sa.text(f"SET LOCAL lock_timeout = '{wait_ms}ms'"))
                job_id = new_id()
                # On PostgreSQL this insert blocks while another transaction holds the key.
                s.execute(sa.insert(IdempotencyKey).values(
                    key=key, body_hash=digest, job_id=job_id, created_at=utcnow()))
                if self.dialect == "postgresql":
                    s.execute(sa.text("SET LOCAL lock_timeout TO DEFAULT"))
                return self._insert_job(s, kind, body, rows, spec, profile, job_id), True
        except OperationalError as e:
            if _is_lock_timeout(e, self.dialect):
                raise IdempotencyInProgress(
                    f"a request with idempotency key {key!r} is still in progress") from e
            raise

    def _lookup_key(self, key: str, digest: str) -> JobView | None:
        with self._read() as s:
            existing = s.get(IdempotencyKey, key)
            if existing is None:
                return None
            return self._answer_existing(s, existing, key, digest)

    def _answer_existing(self, s: Session, existing: IdempotencyKey, key: str,
                         digest: str) -> JobView:
        if existing.body_hash != digest:
            raise IdempotencyMismatch(
                f"idempotency key {key!r} was already used with a different body")
        job = self._load_job(s, existing.job_id)
        if job is None:
            raise NotFound(f"job {existing.job_id} of idempotency key {key!r} no longer exists")
        return _job_view(job)

    def _insert_job(self, s: Session, kind, body, rows, spec, profile,
                    job_id: str | None = None) -> JobView:
        now = utcnow()
        job_id = job_id or new_id()
        s.execute(sa.insert(Job).values(
            id=job_id, kind=kind, status="queued", spec=spec, profile=profile, body=body,
            cancel_requested=False, created_at=now, updated_at=now))
        self._insert_rows(s, job_id, rows, now)
        return _job_view(self._load_job(s, job_id))

    @staticmethod
    def _insert_rows(s: Session, job_id: str, rows: list[NewRow], now: datetime) -> None:
        ids = [new_id() for _ in rows]
        s.execute(sa.insert(Row), [
            dict(id=ids[i], job_id=job_id, index=i, name=r.name, seed=int(r.seed),
                 config=r.config, status="queued", attempts=0, progress_epoch=0,
                 progress_epochs=_epochs_of(r.config), metrics={}, result=None,
                 trained_by=None if r.trained_by is None else ids[r.trained_by],
                 created_at=now, updated_at=now)
            for i, r in enumerate(rows)
        ])

    def get_job(self, job_id: str) -> JobView:
        with self._read() as s:
            job = self._load_job(s, job_id)
            if job is None:
                raise NotFound(f"no job {job_id!r}")
            return _job_view(job)

    def job_kind(self, job_id: str) -> str:
        with self._read() as s:
            kind = s.execute(select(Job.kind).where(Job.id == job_id)).scalar_one_or_none()
            if kind is None:
                raise NotFound(f"no job {job_id!r}")
            return kind

    def get_row(self, row_id: str) -> RowView:
        with self._read() as s:
            row = s.execute(select(Row).where(Row.id == row_id)
                            .options(selectinload(Row.attempt_log))).scalar_one_or_none()
            if row is None:
                raise NotFound(f"no row {row_id!r}")
            return _single_row_view(s, row)

    def list_jobs(self, *, status: str | None = None, kind: str | None = None, limit: int = 20,
                  cursor: str | None = None) -> tuple[list[JobView], str | None]:
        """Newest first; returns ``(jobs, next_cursor)`` (``None`` on the last page)."""
        if status is not None and status not in STATUSES:
            raise ValueError(f"unknown status {status!r}; known: {', '.join(STATUSES)}")
        if kind is not None and kind not in JOB_KINDS:
            raise ValueError(f"unknown job kind {kind!r}; known: {', '.join(JOB_KINDS)}")
        if not isinstance(limit, int) or limit < 1:
            raise ValueError("limit must be a positive integer")
        query = select(Job)
        if status is not None:
            query = query.where(Job.status == status)
        if kind is not None:
            query = query.where(Job.kind == kind)
        if cursor:
            created_at, job_id = _decode_cursor(cursor)
            query = query.where(or_(Job.created_at < created_at,
                                    and_(Job.created_at == created_at, Job.id < job_id)))
        query = (query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)
                 .options(selectinload(Job.rows).selectinload(Row.attempt_log),
                          selectinload(Job.trials)))
        with self._read() as s:
            jobs = s.execute(query).scalars().all()
            more = len(jobs) > limit
            jobs = jobs[:limit]
            next_cursor = _encode_cursor(jobs[-1].created_at, jobs[-1].id) if more else None
            return [_job_view(j) for j in jobs], next_cursor

    def cancel_job(self, job_id: str) -> JobView:
        with self._write() as s:
            job = s.get(Job, job_id)
            if job is None:
                raise NotFound(f"no job {job_id!r}")
            if job.status not in TERMINAL:
                now = utcnow()
                # Rows first, then the job (the lock order of every transaction here).
                s.execute(
                    update(Row).where(Row.job_id == job_id, Row.status == "queued")
                    .values(status="cancelled", lease_owner=None, lease_until=None,
                            updated_at=now)
                    .execution_options(synchronize_session=False))
                job = self._lock_job(s, job_id)
                if job.status not in TERMINAL:
                    job.cancel_requested = True
                    self._recompute(s, job, now)
            s.flush()
            return _job_view(self._load_job(s, job_id))

    def set_job_mlflow_run(self, job_id: str, run_id: str | None) -> None:
        with self._write() as s:
            n = s.execute(update(Job).where(Job.id == job_id)
                          .values(mlflow_run_id=run_id, updated_at=utcnow())
                          .execution_options(synchronize_session=False)).rowcount
            if n != 1:
                raise NotFound(f"no job {job_id!r}")

    # -- dispatcher side -------------------------------------------------------------------

    def claim_rows(self, owner: str, *, lease_seconds: float, limit: int,
                   max_attempts: int) -> list[RowView]:
        """Take up to ``limit`` due rows under a lease: queued ones, and running ones whose
        lease expired (their owner died). Oldest job first, then row index."""
        if limit <= 0:
            return []
        now = utcnow()
        until = now + timedelta(seconds=lease_seconds)
        claimed: list[str] = []
        touched: set[str] = set()
        with self._write() as s:
            # Expired rows of cancelled jobs are never claimed: they end as cancelled here.
            stale = s.execute(
                select(Row).join(Job, Row.job_id == Job.id)
                .where(Job.cancel_requested.is_(True), Row.status == "running",
                       Row.lease_until < now)
                .with_for_update(skip_locked=True, of=Row)
                .execution_options(populate_existing=True)
            ).scalars().all()
            for row in stale:
                self._close_attempt(s, row.id, now, "lost",
                                    f"lease of {row.lease_owner} expired")
                row.status, row.lease_owner, row.lease_until = "cancelled", None, None
                row.updated_at = now
                touched.add(row.job_id)

            while len(claimed) < limit:
                due = s.execute(
                    select(Row).join(Job, Row.job_id == Job.id)
                    .where(Job.cancel_requested.is_(False),
                           or_(Row.status == "queued",
                               and_(Row.status == "running", Row.lease_until < now)),
                           _trainer_done())
                    .order_by(Job.created_at, Job.id, Row.index)
                    .limit(limit - len(claimed))
                    .with_for_update(skip_locked=True, of=Row)
                    .execution_options(populate_existing=True)
                ).scalars().all()
                if not due:
                    break
                for row in due:
                    touched.add(row.job_id)
                    if row.status == "running":  # recovery: the previous owner died
                        previous = row.lease_owner
                        self._close_attempt(s, row.id, now, "lost",
                                            f"lease of {previous} expired")
                        if row.attempts >= max_attempts:
                            dependents = self._lock_dependents(s, row.id)
                            row.status = "failed"
                            row.error = (f"lost or failed {row.attempts} times (max_attempts="
                                         f"{max_attempts}); the last attempt was lost when the "
                                         f"lease of {previous} expired")
                            row.lease_owner, row.lease_until = None, None
                            row.updated_at = now
                            _fail_dependents(dependents, row, now)
                            continue
                    if row.trained_by is not None:
                        trainer = s.get(Row, row.trained_by)
                        if trainer is None or trainer.status != "succeeded":
                            # the claim filter let it through: its trainer ended without a model
                            _fail_dependents([row], trainer, now)
                            continue
                    row.status = "running"
                    row.lease_owner, row.lease_until = owner, until
                    row.attempts += 1
                    row.updated_at = now
                    s.add(Attempt(row_id=row.id, number=row.attempts, owner=owner,
                                  started_at=now))
                    claimed.append(row.id)
                s.flush()
            for job_id in sorted(touched):
                self._recompute(s, self._lock_job(s, job_id), now)
            if not claimed:
                return []
            s.flush()
            rows = s.execute(
                select(Row).where(Row.id.in_(claimed)).options(selectinload(Row.attempt_log))
                .execution_options(populate_existing=True)
            ).scalars().all()
            by_id = {r.id: _single_row_view(s, r) for r in rows}
            return [by_id[i] for i in claimed]

    def renew_lease(self, row_id: str, owner: str, lease_seconds: float) -> bool:
        now = utcnow()
        with self._write() as s:
            n = s.execute(
                update(Row).where(Row.id == row_id, Row.status == "running",
                                  Row.lease_owner == owner)
                .values(lease_until=now + timedelta(seconds=lease_seconds), updated_at=now)
                .execution_options(synchronize_session=False)).rowcount
            return n == 1

    def record_progress(self, row_id: str, owner: str, *, epoch: int, epochs: int,
                        metrics: dict, mlflow_run_id: str | None = None) -> bool:
        _canonical_json(metrics, "metrics")
        now = utcnow()
        with self._write() as s:
            row = self._fenced_row(s, row_id, owner)
            if row is None:
                return False
            row.progress_epoch, row.progress_epochs = int(epoch), int(epochs)
            row.metrics = dict(metrics)
            if mlflow_run_id is not None:
                row.mlflow_run_id = mlflow_run_id
            row.updated_at = now
            s.flush()
            s.execute(update(Job).where(Job.id == row.job_id).values(updated_at=now)
                      .execution_options(synchronize_session=False))
            return True

    def complete_row(self, row_id: str, owner: str, result: dict) -> bool:
        _canonical_json(result, "result")
        now = utcnow()
        with self._write() as s:
            row = self._fenced_row(s, row_id, owner)
            if row is None:
                return False
            metrics = result.get("metrics")
            row.status = "succeeded"
            row.metrics = metrics if metrics is not None else {}
            row.result = result
            row.error = None
            if row.progress_epochs:
                row.progress_epoch = row.progress_epochs
            row.lease_owner, row.lease_until = None, None
            row.updated_at = now
            self._close_attempt(s, row.id, now, "succeeded")
            s.flush()
            self._recompute(s, self._lock_job(s, row.job_id), now)
            return True

    def fail_row(self, row_id: str, owner: str, error: str, *, max_attempts: int,
                 final: bool = False) -> str | None:
        """Returns the row's new status: ``queued`` (will be retried), ``failed`` (attempts used
        up, or ``final``: retrying cannot help), ``cancelled`` (its job was cancelled meanwhile);
        ``None`` if fenced out. A row that fails takes the queued rows waiting for its model
        (``trained_by``) with it, in the same transaction: they fail naming it."""
        now = utcnow()
        with self._write() as s:
            row = self._fenced_row(s, row_id, owner)
            if row is None:
                return None
            self._close_attempt(s, row.id, now, "failed", error)
            retry = row.attempts < max_attempts and not final
            # rows before the job (the lock order): the rows waiting for this row's model
            dependents = [] if retry else self._lock_dependents(s, row.id)
            job = self._lock_job(s, row.job_id)
            if job.cancel_requested:
                status = "cancelled"
            elif retry:
                status = "queued"
            else:
                status = "failed"
            row.status = status
            row.error = error
            row.lease_owner, row.lease_until = None, None
            row.updated_at = now
            if status == "failed":
                _fail_dependents(dependents, row, now)
            s.flush()
            self._recompute(s, job, now)
            return status

    @staticmethod
    def _lock_dependents(s: Session, row_id: str) -> list[Row]:
        """The queued rows that wait for `row_id`'s model, locked."""
        return list(s.execute(
            select(Row).where(Row.trained_by == row_id, Row.status == "queued")
            .order_by(Row.index).with_for_update()
            .execution_options(populate_existing=True)
        ).scalars())

    def rows_to_stop(self, owner: str) -> list[str]:
        with self._read() as s:
            return list(s.execute(
                select(Row.id).join(Job, Row.job_id == Job.id)
                .where(Row.status == "running", Row.lease_owner == owner,
                       Job.cancel_requested.is_(True))
                .order_by(Job.created_at, Job.id, Row.index)
            ).scalars())

    def finish_cancelled(self, row_id: str, owner: str) -> bool:
        now = utcnow()
        with self._write() as s:
            row = self._fenced_row(s, row_id, owner)
            if row is None:
                return False
            self._close_attempt(s, row.id, now, "cancelled")
            row.status = "cancelled"
            row.lease_owner, row.lease_until = None, None
            row.updated_at = now
            s.flush()
            self._recompute(s, self._lock_job(s, row.job_id), now)
            return True

    def release(self, row_id: str, owner: str) -> bool:
        """Give a running row back to the queue (clean shutdown): status ``queued``, its attempt
        closed as ``lost``; ``attempts`` keeps counting it. A row of a cancelled job ends as
        ``cancelled`` instead."""
        now = utcnow()
        with self._write() as s:
            row = self._fenced_row(s, row_id, owner)
            if row is None:
                return False
            job = self._lock_job(s, row.job_id)
            if job.cancel_requested:
                self._close_attempt(s, row.id, now, "cancelled", f"released by {owner}")
                row.status = "cancelled"
            else:
                self._close_attempt(s, row.id, now, "lost", f"released by {owner}")
                row.status = "queued"
            row.lease_owner, row.lease_until = None, None
            row.updated_at = now
            s.flush()
            self._recompute(s, job, now)
            return True


    # -- sweep trials ------------------------------------------------------------------------

    def record_trials(self, row_id: str, owner: str, trials: list[dict]) -> bool:
        """Insert or update a sweep's trials (by trial id) from its driver's latest state; fenced
        by the sweep row's lease like every dispatcher write."""
        for trial in trials:
            _canonical_json({k: trial.get(k) for k in TRIAL_FIELDS}, "trial")
        now = utcnow()
        with self._write() as s:
            row = self._fenced_row(s, row_id, owner)
            if row is None:
                return False
            existing = {t.trial_id: t for t in s.execute(
                select(SweepTrial).where(SweepTrial.job_id == row.job_id)).scalars()}
            for trial in trials:
                record = existing.get(trial["trial_id"])
                if record is None:
                    record = SweepTrial(job_id=row.job_id, trial_id=trial["trial_id"])
                    s.add(record)
                record.status = trial.get("status") or "queued"
                record.params = trial.get("params") or {}
                record.metrics = trial.get("metrics") or {}
                record.epoch = int(trial.get("epoch") or 0)
                record.final = bool(trial.get("final"))
                record.stopped_early = bool(trial.get("stopped_early"))
                record.mlflow_run_id = trial.get("mlflow_run_id")
                record.error = trial.get("error")
                record.updated_at = now
            return True

    def cancel_trials(self, job_id: str) -> list[dict]:
        """Mark the trials of a cancelled sweep that had not ended as cancelled; returns them."""
        now = utcnow()
        with self._write() as s:
            open_trials = s.execute(
                select(SweepTrial).where(SweepTrial.job_id == job_id,
                                         SweepTrial.status.not_in(TRIAL_TERMINAL))
            ).scalars().all()
            for trial in open_trials:
                trial.status, trial.updated_at = "cancelled", now
            s.flush()
            return [_trial_dict(t) for t in open_trials]


def _check_trainer(rows: list[NewRow], i: int) -> None:
    """A row's `trained_by` names an earlier row of the job that trains itself."""
    trainer = rows[i].trained_by
    if trainer is None:
        return
    if not isinstance(trainer, int) or not 0 <= trainer < i:
        raise ValueError(f"row {rows[i].name!r}: trained_by must be the index of an earlier "
                         f"row, got {trainer!r}")
    if rows[trainer].trained_by is not None:
        raise ValueError(f"row {rows[i].name!r}: its trainer {rows[trainer].name!r} does not "
                         "train itself")


def _trainer_done():
    """Claim filter: a row that waits for another row's model is due once that row has ended
    (succeeded: certify its checkpoint; failed, cancelled or gone: the claim fails it). A row
    that trains itself has no trainer and is always due."""
    trainer = aliased(Row)
    return ~sa.exists().where(trainer.id == Row.trained_by, trainer.status.not_in(TERMINAL))


def _fail_dependents(rows: list[Row], trainer: Row | None, now: datetime) -> None:
    """Rows whose model will not be trained fail at once (retrying them cannot help), naming
    the row that was to train it and why it did not."""
    if trainer is None:
        reason = "the row that was to train its model no longer exists"
    else:
        reason = (f"row {trainer.name} (seed {trainer.seed}, id {trainer.id}), which trains this "
                  f"row's model, {trainer.status}"
                  + (f": {trainer.error}" if trainer.error else ""))
    for row in rows:
        row.status = "failed"
        row.error = f"not certified: {reason}"
        row.lease_owner, row.lease_until = None, None
        row.updated_at = now


def _epochs_of(config: dict[str, Any]) -> int:
    """The epochs a row config trains for (0 if it does not say): progress shows 0 of n at once."""
    try:
        return max(0, int(config.get("epochs") or 0))
    except (TypeError, ValueError):
        return 0

"""SQL schema and engine of the job store (SQLAlchemy 2 declarative; schema changes via Alembic).

Tables: ``jobs``, ``rows`` (one training config of a job), ``attempts`` (one per time a dispatcher
took a row), ``idempotency_keys`` and ``trials`` (the Ray Tune trials of a sweep job). Only portable types are used (``sa.JSON``,
``DateTime(timezone=True)``) so the embedded SQLite store and PostgreSQL hold the same data.

``make_engine`` builds an engine with the settings the store relies on:

* SQLite: the parent folder is created; every connection gets ``journal_mode=WAL``,
  ``busy_timeout`` and ``foreign_keys=ON``; pysqlite's own transaction handling is switched off
  and SQLAlchemy emits ``BEGIN IMMEDIATE`` itself (the recipe of SQLAlchemy's SQLite docs), so a
  write transaction takes the write lock up front and two writers never deadlock on a lock
  upgrade. Read-only work uses an engine from ``read_only(engine)``, which begins with a plain
  (deferred) ``BEGIN`` so readers do not queue behind writers (WAL).
* PostgreSQL: ``postgresql://`` and ``postgres://`` URLs are rewritten to the psycopg 3 driver.

``upgrade(engine)`` applies ``alembic upgrade head`` on one of the engine's connections (under a
PostgreSQL advisory lock, so processes that start at once do not race).
"""
from __future__ import annotations

import threading
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.pool import StaticPool

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

SQLITE_BUSY_TIMEOUT_MS = 10_000
# Key of the PostgreSQL advisory lock taken around schema upgrades (any constant bigint).
MIGRATION_LOCK_KEY = 0x6365727472657072  # b"certrepr" as a bigint

# Execution options understood by the SQLite "begin" hook below.
OPT_READ_ONLY = "certrepro_read_only"  # True: deferred BEGIN instead of BEGIN IMMEDIATE
OPT_BUSY_MS = "certrepro_busy_timeout_ms"  # busy timeout (ms) for this transaction's BEGIN


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def new_id() -> str:
    return uuid.uuid4().hex


class UTCDateTime(sa.types.TypeDecorator):
    """``DateTime(timezone=True)`` that always stores UTC and always returns aware UTC datetimes.

    SQLite keeps datetimes as text without an offset; converting to UTC before binding makes the
    stored text comparable (``lease_until < now``) and the value read back is tagged as UTC.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: the job store wants timezone-aware UTC")
        value = value.astimezone(timezone.utc)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    pass


JOB_KINDS = ("run", "table", "sweep")
STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
OUTCOMES = ("succeeded", "failed", "cancelled", "lost")


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(sa.String(32), primary_key=True, default=new_id)
    kind: Mapped[str] = mapped_column(sa.String(16))
    status: Mapped[str] = mapped_column(sa.String(16), default="queued")
    spec: Mapped[str | None] = mapped_column(sa.String(255))
    profile: Mapped[str | None] = mapped_column(sa.String(64))
    body: Mapped[Any] = mapped_column(sa.JSON, nullable=False)
    cancel_requested: Mapped[bool] = mapped_column(sa.Boolean, default=False)
    mlflow_run_id: Mapped[str | None] = mapped_column(sa.String(64))
    error: Mapped[str | None] = mapped_column(sa.Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)

    rows: Mapped[list["Row"]] = relationship(
        back_populates="job", order_by="Row.index", cascade="all, delete-orphan",
        passive_deletes=True,
    )

    trials: Mapped[list["SweepTrial"]] = relationship(
        order_by="SweepTrial.trial_id", cascade="all, delete-orphan", passive_deletes=True,
    )

    __table_args__ = (
        sa.Index("ix_jobs_created_at_id", "created_at", "id"),
        sa.Index("ix_jobs_status", "status"),
    )


class Row(Base):
    __tablename__ = "rows"

    id: Mapped[str] = mapped_column(sa.String(32), primary_key=True, default=new_id)
    job_id: Mapped[str] = mapped_column(
        sa.String(32), sa.ForeignKey("jobs.id", ondelete="CASCADE"), index=True
    )
    index: Mapped[int] = mapped_column(sa.Integer)
    name: Mapped[str] = mapped_column(sa.String(255))
    seed: Mapped[int] = mapped_column(sa.Integer, default=0)
    config: Mapped[Any] = mapped_column(sa.JSON, nullable=False)
    status: Mapped[str] = mapped_column(sa.String(16), default="queued")
    attempts: Mapped[int] = mapped_column(sa.Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(sa.String(255))
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    progress_epoch: Mapped[int] = mapped_column(sa.Integer, default=0)
    progress_epochs: Mapped[int] = mapped_column(sa.Integer, default=0)
    metrics: Mapped[Any] = mapped_column(sa.JSON, nullable=False)
    result: Mapped[Any | None] = mapped_column(sa.JSON(none_as_null=True), nullable=True)
    mlflow_run_id: Mapped[str | None] = mapped_column(sa.String(64))
    error: Mapped[str | None] = mapped_column(sa.Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # The row of the same job that trains this row's model (orchestrator.shared_training);
    # None: the row trains itself.
    trained_by: Mapped[str | None] = mapped_column(sa.String(32), index=True)

    job: Mapped[Job] = relationship(back_populates="rows")
    attempt_log: Mapped[list["Attempt"]] = relationship(
        back_populates="row", order_by="Attempt.number", cascade="all, delete-orphan",
        passive_deletes=True,
    )

    __table_args__ = (
        sa.Index("ix_rows_status_lease_until", "status", "lease_until"),
        sa.UniqueConstraint("job_id", "index", name="uq_rows_job_id_index"),
    )


class Attempt(Base):
    __tablename__ = "attempts"

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    row_id: Mapped[str] = mapped_column(
        sa.String(32), sa.ForeignKey("rows.id", ondelete="CASCADE"), index=True
    )
    number: Mapped[int] = mapped_column(sa.Integer)
    owner: Mapped[str] = mapped_column(sa.String(255))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    outcome: Mapped[str | None] = mapped_column(sa.String(16))
    error: Mapped[str | None] = mapped_column(sa.Text)

    row: Mapped[Row] = relationship(back_populates="attempt_log")

    __table_args__ = (sa.UniqueConstraint("row_id", "number", name="uq_attempts_row_id_number"),)


class SweepTrial(Base):
    """One Ray Tune trial of a sweep job, as the sweep's driver last reported it."""
    __tablename__ = "trials"

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(
        sa.String(32), sa.ForeignKey("jobs.id", ondelete="CASCADE"), index=True
    )
    trial_id: Mapped[str] = mapped_column(sa.String(64))
    status: Mapped[str] = mapped_column(sa.String(16))
    params: Mapped[Any] = mapped_column(sa.JSON, nullable=False)
    metrics: Mapped[Any] = mapped_column(sa.JSON, nullable=False)
    epoch: Mapped[int] = mapped_column(sa.Integer, default=0)
    final: Mapped[bool] = mapped_column(sa.Boolean, default=False)  # certified after training
    stopped_early: Mapped[bool] = mapped_column(sa.Boolean, default=False)
    mlflow_run_id: Mapped[str | None] = mapped_column(sa.String(64))
    error: Mapped[str | None] = mapped_column(sa.Text)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)

    __table_args__ = (sa.UniqueConstraint("job_id", "trial_id", name="uq_trials_job_id_trial_id"),)


class IdempotencyKey(Base):
    __tablename__ = "idempotency_keys"

    key: Mapped[str] = mapped_column(sa.String(255), primary_key=True)
    body_hash: Mapped[str] = mapped_column(sa.String(64))
    job_id: Mapped[str] = mapped_column(sa.String(32))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


# --------------------------------------------------------------------------------------------
# Engine


def normalize_url(url: str) -> str:
    """``postgresql://`` / ``postgres://`` -> ``postgresql+psycopg://``; anything else as given."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def _sqlite_file(url: sa.URL) -> Path | None:
    database = url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


def make_engine(url: str, *, echo: bool = False) -> Engine:
    url_obj = make_url(normalize_url(url))
    backend = url_obj.get_backend_name()
    if backend == "sqlite":
        path = _sqlite_file(url_obj)
        if path is not None:
            path.expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
            engine = sa.create_engine(url_obj, echo=echo)
        elif not url_obj.database or url_obj.database == ":memory:":
            # In memory (unit tests): one connection shared by all threads, so all see one
            # database; fine for tests that do not write from several threads at once.
            engine = sa.create_engine(url_obj, echo=echo, poolclass=StaticPool,
                                      connect_args={"check_same_thread": False})
        else:
            engine = sa.create_engine(url_obj, echo=echo)
        _install_sqlite_hooks(engine)
        return engine
    if backend == "postgresql":
        if url_obj.get_driver_name() != "psycopg":
            url_obj = url_obj.set(drivername="postgresql+psycopg")
        return sa.create_engine(url_obj, echo=echo, pool_pre_ping=True)
    raise ValueError(f"unsupported job store URL {url_obj.render_as_string()!r}: "
                     "use sqlite:///PATH or postgresql://...")


def _install_sqlite_hooks(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, connection_record):
        # SQLAlchemy, not pysqlite, decides when transactions begin (see _on_begin).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()
        connection_record.info["busy_timeout_ms"] = SQLITE_BUSY_TIMEOUT_MS

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        options = conn.get_execution_options()
        busy = int(options.get(OPT_BUSY_MS, SQLITE_BUSY_TIMEOUT_MS))
        info = conn.connection.info
        if info.get("busy_timeout_ms") != busy:
            conn.exec_driver_sql(f"PRAGMA busy_timeout = {busy}")
            info["busy_timeout_ms"] = busy
        conn.exec_driver_sql("BEGIN" if options.get(OPT_READ_ONLY) else "BEGIN IMMEDIATE")


def read_only(engine: Engine) -> Engine:
    """The same engine (same pool) whose transactions begin deferred on SQLite."""
    return engine.execution_options(**{OPT_READ_ONLY: True})


# --------------------------------------------------------------------------------------------
# Migrations


def alembic_config(connection: sa.Connection | None = None):
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


# Alembic keeps the running migration in module-level proxies (``alembic.context``,
# ``alembic.op``): two upgrades in two threads of one process would mix them up, so upgrades in
# one process take turns. Across processes the database lock below does the same.
_UPGRADE_LOCK = threading.Lock()


def upgrade(engine: Engine, revision: str = "head") -> None:
    """``alembic upgrade head`` in one transaction; a no-op when the schema is current.

    Safe when several processes start at once: PostgreSQL takes a transaction-scoped advisory
    lock before alembic looks at the schema; SQLite's ``BEGIN IMMEDIATE`` takes the write lock.
    """
    from alembic import command

    with _UPGRADE_LOCK, engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"),
                               {"key": MIGRATION_LOCK_KEY})
        command.upgrade(alembic_config(connection), revision)


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def head_revision() -> str | None:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head()

"""Shared fixtures: databases for the job store (SQLite files and PostgreSQL databases).

* ``postgres_url``: one fresh PostgreSQL database for the whole session (dropped at the end).
* ``make_postgres_db``: a factory of further fresh, empty PostgreSQL databases (each dropped at
  the end of the test that made it).
* ``db_url``: parametrized ``sqlite`` / ``postgresql``; each test gets its own empty database
  (a file under ``tmp_path``, or a fresh PostgreSQL database: creating one takes ~20 ms).

PostgreSQL is reached on 127.0.0.1:5432 as ``postgres`` (override with ``CERTREPRO_TEST_PG``, a
``postgresql://`` URL of a maintenance database); where no server answers, the PostgreSQL cases
are skipped with the connection error as the reason.
"""
from __future__ import annotations

import os
import uuid

import pytest

PG_ADMIN_URL = os.environ.get("CERTREPRO_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


class _PostgresServer:
    def __init__(self, admin_url: str):
        import psycopg

        self._psycopg = psycopg
        self.admin_url = admin_url
        self._conn = psycopg.connect(admin_url, autocommit=True, connect_timeout=3)

    def create(self) -> str:
        """A new empty database; returns its SQLAlchemy (psycopg) URL."""
        from sqlalchemy.engine import make_url

        name = f"certrepro_test_{uuid.uuid4().hex[:12]}"
        self._conn.execute(f'CREATE DATABASE "{name}"')
        url = make_url(self.admin_url.replace("postgresql://", "postgresql+psycopg://", 1))
        return url.set(database=name).render_as_string(hide_password=False)

    def drop(self, url: str) -> None:
        from sqlalchemy.engine import make_url

        name = make_url(url).database
        self._conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()", (name,))
        self._conn.execute(f'DROP DATABASE IF EXISTS "{name}"')

    def close(self) -> None:
        self._conn.close()


@pytest.fixture(scope="session")
def postgres_server():
    try:
        server = _PostgresServer(PG_ADMIN_URL)
    except Exception as e:  # psycopg.OperationalError, or psycopg missing
        from sqlalchemy.engine import make_url

        where = make_url(PG_ADMIN_URL)
        pytest.skip(f"PostgreSQL not reachable on {where.host}:{where.port or 5432}: {e}".strip())
    yield server
    server.close()


@pytest.fixture(scope="session")
def postgres_url(postgres_server):
    url = postgres_server.create()
    yield url
    postgres_server.drop(url)


@pytest.fixture
def make_postgres_db(postgres_server):
    made: list[str] = []

    def make() -> str:
        made.append(postgres_server.create())
        return made[-1]

    yield make
    for url in made:
        postgres_server.drop(url)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state' / 'jobs.db'}"
    return request.getfixturevalue("make_postgres_db")()

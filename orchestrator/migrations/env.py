"""Alembic environment of the job store.

Programmatic use (``orchestrator.db.upgrade``) passes an open connection, already inside a
transaction, through ``config.attributes["connection"]``; the migrations then run in that
transaction and the caller commits. Without one (the ``alembic`` command line with
``-x url=...`` or ``sqlalchemy.url`` in an ini file), an engine is made from that URL or from
``CERTREPRO_DB_URL`` via the service settings.
"""
from __future__ import annotations

from alembic import context

from orchestrator.db import Base, make_engine

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option(
        "sqlalchemy.url")
    if url:
        return url
    from orchestrator.settings import Settings

    return Settings.from_env().db_url


def _run(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True,
                      dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = make_engine(_url())
    try:
        with engine.begin() as connection:
            _run(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()

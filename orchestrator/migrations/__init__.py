"""Alembic migrations of the job store (applied by ``orchestrator.db.upgrade``)."""

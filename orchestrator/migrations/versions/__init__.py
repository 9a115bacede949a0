"""Alembic revision files of the job store."""

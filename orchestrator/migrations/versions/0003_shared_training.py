"""Shared trainings: a row may name the row of its job that trains its model (`trained_by`); it
then only certifies that row's checkpoint.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27 10:00:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A nullable column without a default: SQLite adds it in place (no table copy, which would
    # run the ON DELETE CASCADE of attempts).
    op.add_column("rows", sa.Column("trained_by", sa.String(32), nullable=True))
    op.create_index("ix_rows_trained_by", "rows", ["trained_by"])


def downgrade() -> None:
    op.drop_index("ix_rows_trained_by", table_name="rows")
    with op.batch_alter_table("rows") as batch:  # SQLite before 3.35 cannot drop a column
        batch.drop_column("trained_by")

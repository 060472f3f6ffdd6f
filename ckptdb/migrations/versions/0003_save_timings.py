"""Save timings: what each checkpoint's save cost (staging, writing, syncing, committing).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28 23:58:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_COLUMNS = ("stage_seconds", "write_seconds", "sync_seconds", "commit_seconds")

# recreate="never": plain ALTER TABLE ADD/DROP COLUMN (SQLite >= 3.35 drops columns in place).
# A batch *recreation* of `checkpoints` would DROP the old table, and with foreign_keys=ON SQLite
# then cascade-deletes every shard, score and event row that refers to it.


def upgrade() -> None:
    with op.batch_alter_table("checkpoints", schema=None, recreate="never") as batch_op:
        for name in _COLUMNS:
            batch_op.add_column(sa.Column(name, sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("checkpoints", schema=None, recreate="never") as batch_op:
        for name in reversed(_COLUMNS):
            batch_op.drop_column(name)

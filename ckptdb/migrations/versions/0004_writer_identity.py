"""Writer identity: the boot and pid namespace a writer ran in (liveness across containers).

Two containers on one node with host networking share a hostname but not pids; a pid is only
meaningful together with the kernel boot (``/proc/sys/kernel/random/boot_id``) and the pid
namespace (the inode of ``/proc/self/ns/pid``) it was read in. Rows written before this revision
have NULLs there: recovery then decides their writer's liveness by its heartbeat, never by pid.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 12:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


# recreate="never": see 0003 (a batch recreation of `checkpoints` would cascade-delete its children).


def upgrade() -> None:
    with op.batch_alter_table("checkpoints", schema=None, recreate="never") as batch_op:
        batch_op.add_column(sa.Column("writer_boot_id", sa.String(64), nullable=True))
        batch_op.add_column(sa.Column("writer_pid_ns", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("checkpoints", schema=None, recreate="never") as batch_op:
        batch_op.drop_column("writer_pid_ns")
        batch_op.drop_column("writer_boot_id")

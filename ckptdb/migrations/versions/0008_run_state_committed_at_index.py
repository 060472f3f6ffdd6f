"""Index ``checkpoints(run_id, state, committed_at)``: a run's newest commit without a scan.

``run_summary.last_committed_at`` is ``MAX(committed_at)`` over a run's committed checkpoints.
PostgreSQL answered it by walking ``ix_checkpoints_state_committed_at`` backwards over every run's
commits until it met one of this run: 3.3 ms per run, 3.3 s of a 3.7 s ``SELECT * FROM run_summary``
over 1 000 runs and 100 000 checkpoints (the UI's runs page read 50 such rows: 0.3 s). With this
index it is one index entry per run. SQLite used ``(run_id, state, step_nr)`` and a short scan.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04 16:50:00.000000
"""

from __future__ import annotations

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_checkpoints_run_id_state_committed_at", "checkpoints", ["run_id", "state", "committed_at"])


def downgrade() -> None:
    op.drop_index("ix_checkpoints_run_id_state_committed_at", table_name="checkpoints")

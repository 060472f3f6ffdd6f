"""Indexes for the retention decision: the run's candidates (partial, covering) and scores by checkpoint.

``ix_checkpoints_retention_candidates``: ``checkpoints(run_id, step_nr, state, model_preserved)``
over the retention candidates only (committed rows and the model-only leftovers of
``preserve_model`` deletions). The decision's scans (the run's candidates, keep_last's newest n,
keep_best's candidates) read this index alone, in step order, without a table row per checkpoint.
Its predicate is the exact text ``retention_sql.candidate()`` renders (state values as literals),
so SQLite and PostgreSQL can prove that the query implies it.

``ix_scores_checkpoint_id_metric_value``: ``scores(checkpoint_id, metric, value)``: keep_best's
per-checkpoint score lookup is answered from the index (the unique ``(checkpoint_id, metric)``
index needs the table row for ``value``).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 17:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

# frozen with this revision (ckptdb.catalog.models holds the same text for the ORM metadata)
CANDIDATE_SQLITE = "state IN ('committed', 'deleted') AND (state = 'committed' OR model_preserved IS 1)"
CANDIDATE_PG = "state IN ('committed', 'deleted') AND (state = 'committed' OR model_preserved IS true)"


def upgrade() -> None:
    op.create_index(
        "ix_checkpoints_retention_candidates",
        "checkpoints",
        ["run_id", "step_nr", "state", "model_preserved"],
        sqlite_where=sa.text(CANDIDATE_SQLITE),
        postgresql_where=sa.text(CANDIDATE_PG),
    )
    op.create_index("ix_scores_checkpoint_id_metric_value", "scores", ["checkpoint_id", "metric", "value"])


def downgrade() -> None:
    op.drop_index("ix_scores_checkpoint_id_metric_value", table_name="scores")
    op.drop_index("ix_checkpoints_retention_candidates", table_name="checkpoints")

"""Analysis views (checkpoint_summary, checkpoint_scores, run_summary) and a cross-run state index.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28 23:55:00

The views are plain SQL, written once and created with the same text on SQLite and PostgreSQL
(only ANSI joins, correlated subqueries, CASE, COALESCE and CAST). They hold no data: creating
or dropping them is instant and takes no lock on the tables beyond a brief catalog-level one.
The index is built over ``checkpoints`` (a few rows per saved checkpoint): seconds even for
millions of rows. The SQL below is frozen with this revision; a later change is a new revision.
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# States whose shard rows may still have files on disk (removed_at IS NULL means "still there").
_ON_DISK = "('committed', 'deleting', 'corrupt', 'deleted')"

CHECKPOINT_SUMMARY = f"""
CREATE VIEW checkpoint_summary AS
SELECT
    c.id AS checkpoint_id,
    r.id AS run_id,
    r.name AS run_name,
    c.step_nr AS step_nr,
    c.state AS state,
    c.directory AS directory,
    c.created_at AS created_at,
    c.committed_at AS committed_at,
    c.state_changed_at AS state_changed_at,
    c.deleted_at AS deleted_at,
    c.delete_reason AS delete_reason,
    c.model_preserved AS model_preserved,
    c.total_bytes AS total_bytes,
    c.file_count AS file_count,
    CASE WHEN c.state IN {_ON_DISK} THEN
        (SELECT CAST(COALESCE(SUM(sh.size_bytes), 0) AS BIGINT) FROM shards sh
         WHERE sh.checkpoint_id = c.id AND sh.removed_at IS NULL)
    ELSE 0 END AS bytes_on_disk,
    (SELECT sc.value FROM scores sc WHERE sc.checkpoint_id = c.id AND sc.metric = 'score') AS score,
    (SELECT COUNT(*) FROM scores sc WHERE sc.checkpoint_id = c.id) AS metric_count,
    CASE WHEN EXISTS (SELECT 1 FROM pins p WHERE p.run_id = c.run_id AND p.step_nr = c.step_nr)
        THEN 1 ELSE 0 END AS pinned,
    c.verified_at AS verified_at,
    c.verify_result AS verify_result,
    c.world_size AS world_size,
    c.hash_algorithm AS hash_algorithm,
    c.writer_host AS writer_host,
    c.ckptdb_version AS ckptdb_version,
    c.torch_version AS torch_version
FROM checkpoints c
JOIN runs r ON r.id = c.run_id
"""

CHECKPOINT_SCORES = """
CREATE VIEW checkpoint_scores AS
SELECT
    c.id AS checkpoint_id,
    r.id AS run_id,
    r.name AS run_name,
    c.step_nr AS step_nr,
    c.state AS state,
    sc.metric AS metric,
    sc.value AS value,
    sc.raw_value AS raw_value,
    c.committed_at AS committed_at,
    CASE WHEN EXISTS (SELECT 1 FROM pins p WHERE p.run_id = c.run_id AND p.step_nr = c.step_nr)
        THEN 1 ELSE 0 END AS pinned
FROM scores sc
JOIN checkpoints c ON c.id = sc.checkpoint_id
JOIN runs r ON r.id = c.run_id
"""

RUN_SUMMARY = f"""
CREATE VIEW run_summary AS
SELECT
    r.id AS run_id,
    r.name AS run_name,
    r.checkpoint_dir AS checkpoint_dir,
    r.created_at AS created_at,
    (SELECT COUNT(*) FROM checkpoints c WHERE c.run_id = r.id) AS checkpoints,
    (SELECT COUNT(*) FROM checkpoints c WHERE c.run_id = r.id AND c.state = 'committed') AS committed,
    (SELECT COUNT(*) FROM checkpoints c WHERE c.run_id = r.id AND c.state = 'pending') AS pending,
    (SELECT COUNT(*) FROM checkpoints c WHERE c.run_id = r.id AND c.state = 'deleted') AS deleted,
    (SELECT COUNT(*) FROM checkpoints c WHERE c.run_id = r.id AND c.state IN ('corrupt', 'missing')) AS damaged,
    (SELECT MIN(c.step_nr) FROM checkpoints c WHERE c.run_id = r.id AND c.state = 'committed') AS first_step,
    (SELECT MAX(c.step_nr) FROM checkpoints c WHERE c.run_id = r.id AND c.state = 'committed') AS last_step,
    (SELECT MAX(c.committed_at) FROM checkpoints c WHERE c.run_id = r.id AND c.state = 'committed')
        AS last_committed_at,
    (SELECT CAST(COALESCE(SUM(c.total_bytes), 0) AS BIGINT) FROM checkpoints c
     WHERE c.run_id = r.id AND c.state = 'committed') AS committed_bytes,
    (SELECT CAST(COALESCE(SUM(sh.size_bytes), 0) AS BIGINT) FROM shards sh
     JOIN checkpoints c ON c.id = sh.checkpoint_id
     WHERE c.run_id = r.id AND sh.removed_at IS NULL AND c.state IN {_ON_DISK}) AS bytes_on_disk,
    (SELECT COUNT(*) FROM pins p WHERE p.run_id = r.id) AS pins
FROM runs r
"""

VIEWS = {
    "checkpoint_summary": CHECKPOINT_SUMMARY,
    "checkpoint_scores": CHECKPOINT_SCORES,
    "run_summary": RUN_SUMMARY,
}


def upgrade() -> None:
    op.create_index("ix_checkpoints_state_committed_at", "checkpoints", ["state", "committed_at"], unique=False)
    for sql in VIEWS.values():
        op.execute(sql)


def downgrade() -> None:
    for name in reversed(list(VIEWS)):
        op.execute(f"DROP VIEW IF EXISTS {name}")
    op.drop_index("ix_checkpoints_state_committed_at", table_name="checkpoints")

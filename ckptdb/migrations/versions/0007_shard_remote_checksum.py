"""Object storage: the server's full-object checksum of each file, next to ckptdb's digest.

``shards.remote_checksum`` holds what the object store keeps for the object (``crc32c:<base64>``,
a full-object CRC32C sent with the upload and checked by the server where it supports that), so
that verification can compare it from a HEAD request without downloading the file. NULL for files
on a filesystem and for rows written before this revision.

Revision ID: 0007
Revises: 0005 (on branch i12-s3; becomes 0006 once the retention-indexes migration is merged)
Create Date: 2026-12-02 18:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("shards", schema=None, recreate="never") as batch_op:
        batch_op.add_column(sa.Column("remote_checksum", sa.String(80), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("shards", schema=None, recreate="never") as batch_op:
        batch_op.drop_column("remote_checksum")

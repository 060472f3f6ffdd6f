"""The `ckptdb sql` sandbox on PostgreSQL: role ``ckptdb_reader`` and ``ckptdb_sql.run_query(text)``.

``ckptdb sql`` runs users' SQL. On PostgreSQL a read-only transaction is not enough: whatever the
login may do (``COPY ... TO PROGRAM``, ``pg_read_file``, ``pg_terminate_backend`` for a superuser),
a query may do too, and ``SET ROLE`` to a weaker role is undone from inside a query by
``set_config('role', ...)``. So the query runs inside a ``SECURITY DEFINER`` function owned by
``ckptdb_reader``: a ``NOLOGIN`` role with no members, no attributes and ``SELECT`` on ckptdb's
tables and views only. Inside such a function PostgreSQL itself refuses to change ``role`` or
``session_authorization`` ("cannot set parameter ... within security-definer function").

Roles are cluster-wide: the role is created once (a concurrent creator in another database is
tolerated), never dropped by a downgrade; the schema ``ckptdb_sql``, the function and the grants
are per database. A migrating user that may not create (or administer) the role gets a NOTICE and
a catalog without the sandbox: ``ckptdb sql`` then refuses, naming what a DBA must run
(docs/sql.md, "Security model"). On SQLite this revision does nothing.

The SQL below is frozen with this revision (it avoids ``%`` and ``:``: it goes to the driver as is).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 13:00:00.000000
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

READER_ROLE = "ckptdb_reader"
OBJECTS = (
    "runs, checkpoints, shards, scores, pins, checkpoint_events, alembic_version, "
    "checkpoint_summary, checkpoint_scores, run_summary"
)

RUN_QUERY = """
CREATE OR REPLACE FUNCTION ckptdb_sql.run_query(query text) RETURNS SETOF record
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
AS $fn$
BEGIN
    IF current_setting('transaction_read_only') <> 'on' THEN
        RAISE EXCEPTION 'ckptdb_sql.run_query runs in a read-only transaction only'
            USING ERRCODE = 'read_only_sql_transaction';
    END IF;
    RETURN QUERY EXECUTE query;
END
$fn$
"""

UPGRADE = f"""
DO $do$
DECLARE
    me text := current_user;
    su boolean;
    granted boolean := false;
BEGIN
    SELECT rolsuper INTO su FROM pg_roles WHERE rolname = current_user;
    BEGIN
        CREATE ROLE {READER_ROLE} NOLOGIN;
    EXCEPTION WHEN duplicate_object OR unique_violation THEN
        NULL;  -- created by another catalog of this cluster (maybe at this very moment)
    END;
    IF NOT su AND NOT pg_has_role(me, '{READER_ROLE}', 'MEMBER') THEN
        EXECUTE 'GRANT {READER_ROLE} TO ' || quote_ident(me);  -- only while setting up (revoked below)
        granted := true;
    END IF;
    CREATE SCHEMA IF NOT EXISTS ckptdb_sql AUTHORIZATION {READER_ROLE};
    REVOKE ALL ON SCHEMA ckptdb_sql FROM PUBLIC;
    EXECUTE $q${RUN_QUERY}$q$;
    ALTER FUNCTION ckptdb_sql.run_query(text) OWNER TO {READER_ROLE};
    REVOKE ALL ON FUNCTION ckptdb_sql.run_query(text) FROM PUBLIC;
    GRANT SELECT ON {OBJECTS} TO {READER_ROLE};
    IF NOT su THEN  -- the catalog's own user may use `ckptdb sql`; other logins are granted by a DBA
        EXECUTE 'GRANT USAGE ON SCHEMA ckptdb_sql TO ' || quote_ident(me);
        EXECUTE 'GRANT EXECUTE ON FUNCTION ckptdb_sql.run_query(text) TO ' || quote_ident(me);
    END IF;
    IF granted THEN
        EXECUTE 'REVOKE {READER_ROLE} FROM ' || quote_ident(me);
    END IF;
EXCEPTION WHEN insufficient_privilege THEN
    RAISE NOTICE USING MESSAGE = 'ckptdb: user ' || me || ' may not create or administer role {READER_ROLE}: '
        || '`ckptdb sql` stays disabled on this catalog until a DBA sets it up (docs/sql.md, Security model)';
END
$do$
"""

DOWNGRADE = f"""
DO $do$
DECLARE
    me text := current_user;
    su boolean;
    granted boolean := false;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{READER_ROLE}') THEN
        RETURN;
    END IF;
    SELECT rolsuper INTO su FROM pg_roles WHERE rolname = current_user;
    IF NOT su AND NOT pg_has_role(me, '{READER_ROLE}', 'MEMBER')
            AND EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'ckptdb_sql') THEN
        EXECUTE 'GRANT {READER_ROLE} TO ' || quote_ident(me);
        granted := true;
    END IF;
    DROP SCHEMA IF EXISTS ckptdb_sql CASCADE;
    REVOKE SELECT ON {OBJECTS} FROM {READER_ROLE};
    IF granted THEN
        EXECUTE 'REVOKE {READER_ROLE} FROM ' || quote_ident(me);
    END IF;
END
$do$
"""


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        bind.exec_driver_sql(UPGRADE)


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        bind.exec_driver_sql(DOWNGRADE)

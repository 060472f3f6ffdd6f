"""Create, check and upgrade the catalog schema with alembic, configured in code.

Opening a catalog creates a brand-new (empty) database through the migrations; an existing
database that is behind (or ahead of) this ckptdb raises :class:`SchemaOutOfDateError` naming
the command to run. Creation is serialised between processes (a file lock for SQLite, an
advisory lock for PostgreSQL) so two processes opening a new catalog at once cannot race.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, inspect, text

from ckptdb.catalog.models import VIEW_NAMES
from ckptdb.catalog.session import get_engine, masked, translate
from ckptdb.errors import CatalogError, SchemaOutOfDateError

_ADVISORY_KEY = 0x636B7074  # "ckpt"


def alembic_config(url: str | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).resolve().parent.parent / "migrations"))
    if url is not None:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def include_object(obj: object, name: str | None, type_: str, reflected: bool, compare_to: object) -> bool:
    """For autogenerate / compare_metadata: the analysis views (revision 0002) are not ORM tables."""
    return not (type_ == "table" and name in VIEW_NAMES)


def head_revision() -> str:
    heads = ScriptDirectory.from_config(alembic_config()).get_heads()
    if len(heads) != 1:
        raise CatalogError(f"ckptdb migrations have {len(heads)} heads; expected exactly one")
    return heads[0]


def current_revision(conn: Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()


@contextmanager
def _schema_lock(engine: Engine, conn: Connection) -> Iterator[None]:
    """Serialise schema creation/upgrade between processes."""
    if engine.dialect.name == "sqlite":
        db = engine.url.database
        if db and db != ":memory:":
            lock_path = Path(db).with_name(Path(db).name + ".migrate-lock")
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
            return
        yield
    elif engine.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _ADVISORY_KEY})
        conn.commit()
        try:
            yield
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _ADVISORY_KEY})
            conn.commit()
    else:
        yield


def _run(url: str, fn: str, revision: str) -> None:
    engine = get_engine(url)
    try:
        with engine.connect() as lock_conn, _schema_lock(engine, lock_conn):
            with engine.begin() as conn:
                cfg = alembic_config(url)
                cfg.attributes["connection"] = conn
                getattr(command, fn)(cfg, revision)
    except CatalogError:
        raise
    except Exception as e:
        from sqlalchemy import exc

        if isinstance(e, exc.SQLAlchemyError):
            raise translate(e, url) from e
        raise CatalogError(f"catalog {masked(url)}: migration {fn} to {revision!r} failed: {e}") from e


def upgrade(url: str, revision: str = "head") -> None:
    _run(url, "upgrade", revision)


def downgrade(url: str, revision: str) -> None:
    _run(url, "downgrade", revision)


def current(url: str) -> str | None:
    engine = get_engine(url)
    try:
        with engine.connect() as conn:
            return current_revision(conn)
    except Exception as e:
        from sqlalchemy import exc

        if isinstance(e, exc.SQLAlchemyError):
            raise translate(e, url) from e
        raise


def ensure_schema(url: str, *, create: bool = True) -> None:
    """Create a new catalog, accept an up-to-date one, refuse an out-of-date one."""
    engine = get_engine(url)
    head = head_revision()
    try:
        with engine.connect() as conn:
            rev = current_revision(conn)
            if rev == head:
                return
            if rev is None:
                if not create:
                    raise SchemaOutOfDateError(
                        f"catalog {masked(url)} has no ckptdb schema: run `ckptdb db upgrade --url {masked(url)}`"
                    )
                tables = set(inspect(conn).get_table_names())
                if tables & {"runs", "checkpoints", "shards", "scores"}:
                    raise SchemaOutOfDateError(
                        f"catalog {masked(url)} has ckptdb-like tables but no alembic version: "
                        "it was not created by ckptdb; refusing to touch it"
                    )
    except CatalogError:
        raise
    except Exception as e:
        from sqlalchemy import exc

        if isinstance(e, exc.SQLAlchemyError):
            raise translate(e, url) from e
        raise
    if rev is None:
        upgrade(url, "head")  # re-checks under the lock: a racing creator makes this a no-op
        return
    script = ScriptDirectory.from_config(alembic_config())
    known = {r.revision for r in script.walk_revisions()}
    if rev not in known:
        raise SchemaOutOfDateError(
            f"catalog {masked(url)} is at revision {rev}, newer than this ckptdb knows (head {head}): upgrade ckptdb"
        )
    raise SchemaOutOfDateError(
        f"catalog {masked(url)} is at revision {rev}, this ckptdb needs {head}: "
        f"run `ckptdb db upgrade --url {masked(url)}` (back up a shared catalog first)"
    )

"""Engines, SQLite pragmas, transactions and the one place driver errors become ckptdb errors."""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from sqlalchemy import Engine, create_engine, event, exc
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session

from ckptdb.errors import (
    CatalogError,
    CatalogUnavailableError,
    ConcurrentModificationError,
    SchemaOutOfDateError,
)

SQLITE_BUSY_TIMEOUT_MS = 60_000
_engines: dict[str, Engine] = {}
_engines_lock = threading.Lock()


# URL query parameters whose value is a secret (libpq: password, sslpassword; drivers' aliases).
# ``passfile``, ``sslkey`` and ``sslcert`` name files: not secret themselves, shown as given.
_SECRET_PARAM = re.compile(r"pass(?!file)|pwd|secret|token|credential", re.I)
# ``password=...`` in libpq conninfo strings / query strings, and ``user:password@`` in URLs.
_SECRET_TEXT = re.compile(
    r"(?i)\b((?:ssl)?pass(?:word|wd|phrase)?|pwd|[a-z_]*(?:secret|token))(\s*=\s*)"
    r"('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|[^\s&;,'\")]+)"
)
_URL_USERINFO = re.compile(r"(://[^:/@\s]*):[^@/\s]+@")


def _is_secret_param(name: str) -> bool:
    return bool(_SECRET_PARAM.search(name))


def masked(url: str | URL) -> str:
    """The URL with any password replaced by ``***`` (safe for errors, logs and CLI output).

    Both forms are masked: ``user:password@host`` and query parameters such as ``?password=``
    or ``?sslpassword=`` (any parameter whose name says pass/pwd/secret/token, but ``passfile``).
    """
    try:
        rendered = make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparsable URL: show only its scheme
        s = str(url)
        return s.split("://", 1)[0] + "://***" if "://" in s else "<unparsable URL>"
    base, sep, query = rendered.partition("?")
    if not sep:
        return rendered
    pairs = [p.partition("=") for p in query.split("&")]
    return base + "?" + "&".join(k + eq + ("***" if _is_secret_param(unquote(k)) else v) for k, eq, v in pairs)


def secrets_of(url: str | URL | None) -> list[str]:
    """The secret values a URL carries (its password and secret query parameters)."""
    if url is None:
        return []
    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001 - unparsable: nothing to extract
        return []
    out = [parsed.password] if parsed.password else []
    for k, v in parsed.query.items():
        if _is_secret_param(k):
            out.extend([v] if isinstance(v, str) else list(v))
    return [str(s) for s in out if s and len(str(s)) >= 3]


def scrub(text: str, url: str | URL | None = None) -> str:
    """``text`` with secrets replaced by ``***``: ``password=...`` (conninfo or query string), the
    password of ``scheme://user:password@``, and every secret value ``url`` carries (drivers'
    error messages may quote the connection string they were given)."""
    text = _SECRET_TEXT.sub(lambda m: f"{m.group(1)}{m.group(2)}***", text)
    text = _URL_USERINFO.sub(r"\1:***@", text)
    for value in sorted(secrets_of(url), key=len, reverse=True):
        text = text.replace(value, "***")
    return text


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


def is_sql_url(text: str) -> bool:
    """Whether ``text`` is a URL SQLAlchemy has a dialect for (a catalog), not a storage URL (``s3://``)."""
    try:
        make_url(text).get_dialect()
    except Exception:  # noqa: BLE001 - unparseable, or no such dialect
        return False
    return True


def parse_url(url: str) -> URL:
    try:
        return make_url(url)
    except exc.ArgumentError as e:
        raise CatalogUnavailableError(f"invalid catalog URL {masked(url)!r}: {scrub(str(e), url)}") from None


# SQLite's messages for a failure of the file below it (SQLITE_IOERR, _READONLY, _CANTOPEN, _FULL).
# When SQLite cannot open the database or its -wal/-shm read-write (a transient EIO/EROFS), it
# silently falls back to read-only, and that state is kept per file for as long as any connection
# of the process has it open: every later write would fail with "attempt to write a readonly
# database". After such an error the connection is dropped and the engine's pool disposed, so the
# next transaction opens the file afresh (found by scripts/faultcheck).
_SQLITE_FILE_ERRORS = (
    "disk i/o error",
    "readonly database",
    "unable to open database file",
    "database or disk is full",
)


def _sqlite_file_error(message: str) -> bool:
    low = message.lower()
    return any(w in low for w in _SQLITE_FILE_ERRORS)


def _install_sqlite_pragmas(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (below)
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA journal_mode = WAL")
        cur.execute("PRAGMA synchronous = FULL")
        cur.execute("PRAGMA foreign_keys = ON")
        cur.close()

    @event.listens_for(engine, "handle_error")
    def _on_error(ctx: Any) -> None:
        # the file failed below SQLite: this connection is not reused (see _SQLITE_FILE_ERRORS)
        if _sqlite_file_error(str(ctx.original_exception)):
            ctx.is_disconnect = True
            cursor = getattr(ctx.execution_context, "cursor", None)
            if cursor is not None:  # an open statement would keep the closed connection (and its
                try:  # read-only fallback) alive as a zombie (sqlite3_close_v2): finalize it now
                    cursor.close()
                except Exception:  # noqa: BLE001 - best effort; the error itself is raised below
                    pass

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # Writers take the write lock up front: no deadlock-prone read->write lock upgrades.
        if conn.get_execution_options().get("ckptdb_readonly"):
            conn.exec_driver_sql("BEGIN")
        else:
            conn.exec_driver_sql("BEGIN IMMEDIATE")


def _refuse_network_filesystem(url: str, directory: Path) -> None:
    """SQLite in WAL mode is unsafe on NFS, SMB, Lustre, ... (ckptdb.catalog.netfs): refuse, unless overridden."""
    from ckptdb.catalog import netfs

    fs = netfs.network_filesystem(directory)
    if fs is not None and not netfs.allowed_by_env():
        raise CatalogUnavailableError(
            f"catalog {masked(url)}: {str(directory)!r} is on a network filesystem ({fs}); a SQLite catalog "
            "(WAL mode) there can be corrupted by processes on other machines. Use a PostgreSQL catalog "
            "(--url / catalog=postgresql+psycopg://user@host/db), or keep the SQLite file on a local disk; "
            f"if only this one machine ever opens it, set {netfs.ALLOW_ENV}=1 to proceed at your own risk"
        )


def get_engine(url: str) -> Engine:
    """One engine per URL per process (pragmas installed on this engine only)."""
    with _engines_lock:
        engine = _engines.get(url)
        if engine is not None:
            return engine
        parsed = parse_url(url)
        kwargs: dict[str, Any] = {"future": True}
        if parsed.get_backend_name() == "sqlite":
            db = parsed.database
            if db and db != ":memory:":
                parent = Path(db).expanduser().parent
                _refuse_network_filesystem(url, parent)
                if not os.path.isdir(parent):  # an unreachable mount (ENOTCONN, EIO) too
                    raise CatalogUnavailableError(f"catalog {masked(url)}: directory {str(parent)!r} does not exist")
            kwargs["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False}
        else:
            kwargs["pool_pre_ping"] = True
            kwargs["pool_size"] = 2
            kwargs["max_overflow"] = 4
            if parsed.get_backend_name() == "postgresql":
                kwargs["connect_args"] = {"connect_timeout": 10}
        try:
            engine = create_engine(parsed, **kwargs)
        except (exc.ArgumentError, exc.NoSuchModuleError, ImportError) as e:
            raise CatalogUnavailableError(f"catalog {masked(url)}: {scrub(str(e), url)}") from None
        if parsed.get_backend_name() == "sqlite":
            _install_sqlite_pragmas(engine)
        _engines[url] = engine
        return engine


def _after_fork_in_child() -> None:
    # A forked child must not reuse the parent's pooled connections (DataLoader workers, ...).
    for engine in list(_engines.values()):
        engine.dispose(close=False)


os.register_at_fork(after_in_child=_after_fork_in_child)


def dispose_engines() -> None:
    """Close every pooled connection (tests; after fork)."""
    with _engines_lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()


def translate(error: Exception, url: str) -> CatalogError:
    """Map a SQLAlchemy / driver error to a ckptdb error that names the (masked) catalog."""
    orig = getattr(error, "orig", None)
    if url.startswith("sqlite") and _sqlite_file_error(str(orig if orig is not None else error)):
        engine = _engines.get(url)
        if engine is not None:  # start afresh: no connection keeps SQLite's read-only fallback alive
            engine.dispose()
    detail = (str(orig) if orig is not None else str(error)).strip().splitlines()
    first = scrub(detail[0], url) if detail else type(error).__name__
    where = masked(url)
    if isinstance(error, exc.IntegrityError):
        return ConcurrentModificationError(f"catalog {where}: conflicting change: {first}")
    low = first.lower()
    if "no such table" in low or ("relation" in low and "does not exist" in low):
        return SchemaOutOfDateError(
            f"catalog {where} has no ckptdb schema (or an old one): run `ckptdb db upgrade --url {where}`"
        )
    if isinstance(error, exc.OperationalError | exc.InterfaceError | exc.DisconnectionError):
        if "locked" in low or "busy" in low:
            return CatalogError(f"catalog {where} stayed locked by another process: {first}")
        return CatalogUnavailableError(f"catalog {where} is unavailable: {first}")
    if isinstance(error, exc.DBAPIError | exc.SQLAlchemyError):
        return CatalogError(f"catalog {where}: {first}")
    return CatalogError(f"catalog {where}: {first}")


class CatalogSession:
    """Transactions over one catalog URL; errors come out as ckptdb errors."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = get_engine(url)
        self._held = threading.local()  # .session: the transaction a `held()` block of this thread runs

    @contextmanager
    def held(self) -> Iterator[Session]:
        """One transaction that every :meth:`transaction` of this thread joins until the block ends.

        Used to hold a lock (``Catalog.run_lock``) across several catalog calls and the filesystem
        steps between them: one commit at the end, one rollback on error.
        """
        if getattr(self._held, "session", None) is not None:
            raise RuntimeError("ckptdb: a held catalog transaction is already open in this thread")
        with self.transaction() as s:
            self._held.session = s
            try:
                yield s
            finally:
                self._held.session = None

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def transaction(self, *, readonly: bool = False) -> Iterator[Session]:
        """One transaction: committed on success, rolled back (and translated) on error.

        Inside a :meth:`held` block of the same thread, this joins that transaction instead.
        """
        joined: Session | None = getattr(self._held, "session", None)
        if joined is not None:
            try:
                joined.flush()
                joined.expunge_all()  # read rows afresh: bulk updates do not refresh loaded objects
                yield joined
                joined.flush()
                joined.expunge_all()
            except exc.SQLAlchemyError as e:
                raise translate(e, self.url) from e
            return
        try:
            with self.engine.connect() as conn:
                if readonly:
                    conn = conn.execution_options(ckptdb_readonly=True)
                with Session(bind=conn, expire_on_commit=False) as session:
                    try:
                        yield session
                        session.commit()
                    except BaseException:
                        session.rollback()
                        raise
        except exc.SQLAlchemyError as e:
            raise translate(e, self.url) from e

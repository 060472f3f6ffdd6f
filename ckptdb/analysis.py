"""The analysis surface behind ``ckptdb sql``, ``runs``, ``show`` and ``plot``.

:func:`readonly_query` runs users' SQL so that it can read ckptdb's tables and views and do
nothing else (docs/sql.md, "Security model"):

- SQLite: the file is opened ``mode=ro`` with ``PRAGMA query_only``, and an authorizer allows
  reads only (no ATTACH, VACUUM INTO, pragma changes; extension loading stays disabled).
- PostgreSQL: exactly one query (it must parse as ``DECLARE ... CURSOR FOR <query>``, which takes
  SELECT, VALUES, TABLE and WITH ... SELECT without data-modifying parts), in a ``READ ONLY``
  transaction with a ``statement_timeout``, run inside ``ckptdb_sql.run_query``: a ``SECURITY
  DEFINER`` function owned by the ``NOLOGIN`` role ``ckptdb_reader`` (migration 0005), which may
  only SELECT ckptdb's tables and views. Inside it PostgreSQL refuses to change ``role`` or
  ``session_authorization``, so a query cannot take back the login's own rights, even a superuser's.

The views it usually reads (``checkpoint_summary``, ``checkpoint_scores``, ``run_summary``) come
from migration 0002 and are described in docs/sql.md.
"""

from __future__ import annotations

import math
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, exc
from sqlalchemy.pool import NullPool, QueuePool

from ckptdb.catalog import Catalog
from ckptdb.catalog.session import SQLITE_BUSY_TIMEOUT_MS, masked, parse_url, scrub
from ckptdb.errors import CatalogError, CatalogUnavailableError, CheckpointNotFoundError

READER_ROLE = "ckptdb_reader"
SANDBOX_FUNCTION = "ckptdb_sql.run_query(text)"
DEFAULT_TIMEOUT_S = 60.0


@dataclass(frozen=True, slots=True)
class QueryResult:
    columns: list[str]
    rows: list[tuple[Any, ...]]
    truncated: bool = False  # more rows than ``max_rows``


_SQLITE_READ_ACTIONS = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, 33}  # 33: RECURSIVE
_SQLITE_ACTING_PRAGMAS = {"optimize", "wal_checkpoint", "shrink_memory", "incremental_vacuum"}  # act even bare
_SQLITE_READ_PRAGMAS = {"table_info", "table_xinfo", "index_list", "index_info", "index_xinfo", "foreign_key_list"}
_SQLITE_DENIED_FUNCTIONS = {"load_extension", "readfile", "writefile", "edit", "fts3_tokenizer"}


def _sqlite_readonly_authorizer(
    action: int, arg1: str | None, arg2: str | None, db: str | None, src: str | None
) -> int:
    """Only reads: blocks ATTACH (creates files), VACUUM INTO (writes a copy) and pragma changes too."""
    if action == sqlite3.SQLITE_FUNCTION and (arg2 or "").lower() in _SQLITE_DENIED_FUNCTIONS:
        return sqlite3.SQLITE_DENY
    if action in _SQLITE_READ_ACTIONS:
        return sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_PRAGMA:
        name = (arg1 or "").lower()
        if name in _SQLITE_READ_PRAGMAS or (arg2 is None and name not in _SQLITE_ACTING_PRAGMAS):
            return sqlite3.SQLITE_OK
    return sqlite3.SQLITE_DENY


def _pg_no_jit(dbapi_conn: Any, _record: Any) -> None:
    """The session's JIT off, where the server has one (PostgreSQL 11+; a no-op before): compiling a
    query over the views (run_summary: ~85 functions) took ~0.3 s here, several times what running
    it takes on a catalog of 100 000 checkpoints (docs/sql.md)."""
    with dbapi_conn.cursor() as cur:
        cur.execute("SELECT set_config('jit', 'off', false) WHERE current_setting('jit', true) IS NOT NULL")
    dbapi_conn.commit()  # a session setting made in a transaction lasts only if that transaction commits


def readonly_engine(url: str, *, pooled: bool = False) -> Any:
    """An engine whose every connection the database keeps read-only (what ``ckptdb sql`` and
    ``ckptdb ui`` read through). ``pooled``: keep connections for reuse (a long-lived server)."""
    parsed = parse_url(url)
    pool: dict[str, Any] = {"poolclass": QueuePool if pooled else NullPool}
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        db = parsed.database
        if not db or db == ":memory:" or not Path(db).expanduser().exists():
            raise CatalogUnavailableError(f"catalog {masked(url)}: no such SQLite file")
        path = Path(db).expanduser().resolve()

        def connect() -> sqlite3.Connection:
            conn = sqlite3.connect(
                f"{path.as_uri()}?mode=ro", uri=True, timeout=SQLITE_BUSY_TIMEOUT_MS / 1000, check_same_thread=False
            )
            conn.execute("PRAGMA query_only = ON")
            conn.set_authorizer(_sqlite_readonly_authorizer)
            return conn

        return create_engine("sqlite://", creator=connect, **pool)
    if backend == "postgresql":
        engine = create_engine(
            parsed,
            **pool,
            connect_args={"connect_timeout": 10, "options": "-c default_transaction_read_only=on"},
        )
        event.listen(engine, "connect", _pg_no_jit)
        return engine
    raise CatalogUnavailableError(f"catalog {masked(url)}: `ckptdb sql` supports SQLite and PostgreSQL only")


def readonly_query(
    url: str, sql: str, *, max_rows: int | None = None, timeout_s: float = DEFAULT_TIMEOUT_S
) -> QueryResult:
    """Run one SQL query that can only read ckptdb's tables and views; return its columns and rows.

    Anything else (writes, DDL, several statements, ``COPY``, ``SET``, server functions the
    reader role may not call) raises :class:`CatalogError` whose message says ``ckptdb sql`` is
    read-only and what the database refused. A query running longer than ``timeout_s`` is
    cancelled; at most ``max_rows`` rows are returned (``truncated`` says whether more existed).

    Example:
        >>> readonly_query(url, "SELECT step_nr, score FROM checkpoint_summary")  # doctest: +SKIP
    """
    return _query(url, sql, max_rows=max_rows, timeout_s=timeout_s, sandbox=True)


def _query(url: str, sql: str, *, max_rows: int | None, timeout_s: float, sandbox: bool) -> QueryResult:
    engine = readonly_engine(url)
    backend = engine.dialect.name
    try:
        raw = engine.raw_connection()
        try:
            if backend == "postgresql":
                res = _pg_query(raw.driver_connection, url, sql, max_rows, timeout_s, sandbox)
            else:
                res = _sqlite_query(raw.driver_connection, sql, max_rows, timeout_s)
            raw.rollback()
        finally:
            raw.close()
    except CatalogError:
        raise
    except (sqlite3.Error, exc.DBAPIError, exc.SQLAlchemyError) as e:
        raise _query_error(e, url) from None
    except Exception as e:  # psycopg errors raised through the raw DBAPI cursor
        if type(e).__module__.startswith("psycopg"):
            raise _query_error(e, url) from None
        raise
    finally:
        engine.dispose()
    return res


def _fetch(cur: Any, max_rows: int | None) -> tuple[list[tuple[Any, ...]], bool]:
    if max_rows is None:
        return [tuple(r) for r in cur.fetchall()], False
    rows = [tuple(r) for r in cur.fetchmany(max_rows + 1)]
    return rows[:max_rows], len(rows) > max_rows


def _sqlite_query(conn: sqlite3.Connection, sql: str, max_rows: int | None, timeout_s: float) -> QueryResult:
    deadline = time.monotonic() + timeout_s
    conn.set_progress_handler(lambda: int(time.monotonic() > deadline), 10_000)  # nonzero: interrupt
    cur = conn.cursor()
    try:
        cur.execute(sql)  # sqlite3 runs one statement only, on a file opened read-only
    except sqlite3.OperationalError as e:
        if "interrupted" in str(e):
            raise CatalogError(f"`ckptdb sql`: the query ran longer than its timeout ({timeout_s:g} s)") from None
        raise
    columns = [d[0] for d in cur.description] if cur.description else []
    rows, truncated = _fetch(cur, max_rows) if columns else ([], False)
    cur.close()
    return QueryResult(columns, rows, truncated)


_SANDBOX_CHECK = """
SELECT r.rolname, p.prosecdef, n.nspowner = p.proowner,
       r.rolsuper OR r.rolcreaterole OR r.rolcreatedb OR r.rolcanlogin OR r.rolreplication OR r.rolbypassrls,
       EXISTS (SELECT 1 FROM pg_auth_members m WHERE m.roleid = r.oid OR m.member = r.oid),
       has_function_privilege(p.oid, 'EXECUTE') AND has_schema_privilege(n.oid, 'USAGE')
FROM pg_proc p
JOIN pg_namespace n ON n.oid = p.pronamespace
JOIN pg_roles r ON r.oid = p.proowner
WHERE n.nspname = 'ckptdb_sql' AND p.proname = 'run_query' AND p.proargtypes = '25'::oidvector
"""


def _no_sandbox(url: str, why: str) -> CatalogError:
    return CatalogError(
        f"catalog {masked(url)}: `ckptdb sql` is read-only and runs queries only inside the sandbox "
        f"{SANDBOX_FUNCTION} owned by role {READER_ROLE} (migration 0005), but {why}. "
        "A DBA (a superuser) must run the setup in docs/sql.md, section 'Security model', in this database, "
        f"and grant a read-only login EXECUTE on {SANDBOX_FUNCTION}; then pass that login with --url"
    )


def _check_sandbox(cur: Any, url: str) -> None:
    cur.execute(_SANDBOX_CHECK)
    row = cur.fetchone()
    if row is None:
        raise _no_sandbox(url, "this database has none (the user that created the catalog may not create roles)")
    owner, secdef, owns_schema, powerful, memberships, can_call = row
    if owner != READER_ROLE or not secdef or not owns_schema or powerful or memberships:
        raise _no_sandbox(
            url,
            f"it was altered (owner {owner}, security definer {secdef}, schema owner {owns_schema}, "
            f"role attributes {powerful}, role memberships {memberships}): refusing to run",
        )
    if not can_call:
        raise _no_sandbox(url, "this login may not execute it")


def _pg_describe(pg: Any, sql: str) -> tuple[list[str], list[int], list[int]]:
    """Parse (never run) the query: one statement that DECLARE CURSOR accepts; its columns."""
    from psycopg import pq

    body = sql.strip().rstrip(";").encode()
    for text in (b"DECLARE ckptdb_gate NO SCROLL CURSOR FOR " + body, body):
        res = pg.pgconn.prepare(b"", text)
        if res.status != pq.ExecStatus.COMMAND_OK:
            why = (res.error_message or b"").decode(errors="replace").strip().splitlines()
            raise CatalogError(
                "`ckptdb sql` is read-only: it runs exactly one query (SELECT, VALUES, TABLE or WITH ... SELECT, "
                f"without data-modifying parts); refused: {why[0] if why else 'not a query'}"
            )
    d = pg.pgconn.describe_prepared(b"")
    n = d.nfields
    if n == 0:
        raise CatalogError("`ckptdb sql` is read-only: the query returns no columns")
    return [d.fname(i).decode() for i in range(n)], [d.ftype(i) for i in range(n)], [d.fmod(i) for i in range(n)]


def _pg_query(pg: Any, url: str, sql: str, max_rows: int | None, timeout_s: float, sandbox: bool) -> QueryResult:
    cur = pg.cursor()
    cur.execute("SET TRANSACTION READ ONLY")
    cur.execute("SELECT 1")  # a query ran: the transaction can no longer be made read-write
    cur.execute(f"SET LOCAL statement_timeout = {max(1, int(timeout_s * 1000))}")
    cur.execute("SET LOCAL idle_in_transaction_session_timeout = 600000")
    if not sandbox:  # ckptdb's own fixed queries (runs, show): the login's rights, read-only
        cur.execute(sql, prepare=True)
        columns = [d[0] for d in cur.description] if cur.description else []
        rows, truncated = _fetch(cur, max_rows) if columns else ([], False)
        return QueryResult(columns, rows, truncated)
    _check_sandbox(cur, url)
    columns, oids, mods = _pg_describe(pg, sql)
    cur.execute(
        "SELECT format_type(t, m), y.typtype = 'p' FROM unnest(%s::oid[], %s::int[]) WITH ORDINALITY AS x(t, m, i)"
        " JOIN pg_type y ON y.oid = x.t ORDER BY i",
        [oids, mods],
    )
    typed = cur.fetchall()
    pseudo = [f"{c} ({t})" for c, (t, p) in zip(columns, typed, strict=True) if p]
    if pseudo:
        raise CatalogError(
            f"`ckptdb sql`: column {', '.join(pseudo)} has a pseudo-type that cannot be returned: "
            "select it in an expression of a real type (e.g. `f() IS NULL`, `row_to_json(r)`)"
        )
    types = [t for t, _ in typed]
    defs = ", ".join(f'"c{i}" {t}' for i, t in enumerate(types))
    rows_cur = pg.cursor(name="ckptdb_sql_rows")  # server-side: only max_rows (+1) rows travel
    rows_cur.execute(f"SELECT * FROM {SANDBOX_FUNCTION.split('(')[0]}(%s) AS q({defs})", [sql])
    rows, truncated = _fetch(rows_cur, max_rows)
    rows_cur.close()
    return QueryResult(columns, rows, truncated)


def _query_error(e: BaseException, url: str) -> CatalogError:
    first = scrub((str(getattr(e, "orig", None) or e).strip().splitlines() or [type(e).__name__])[0])
    low = first.lower()
    if "statement timeout" in low or "canceling statement" in low:
        return CatalogError(f"catalog {masked(url)}: `ckptdb sql`: the query ran longer than its timeout: {first}")
    if any(
        w in low
        for w in (
            "readonly",
            "read-only",
            "read only",
            "query_only",
            "not authorized",
            "authorization denied",
            "permission denied",
            "security-definer",
            "must be",
            "password is required",
        )
    ):
        return CatalogError(f"catalog {masked(url)}: `ckptdb sql` is read-only; refused: {first}")
    if "unable to open" in low or ("connection" in low and "failed" in low):
        return CatalogUnavailableError(f"catalog {masked(url)} is unavailable: {first}")
    return CatalogError(f"catalog {masked(url)}: query failed: {first}")


# -- runs / show ---------------------------------------------------------------------------------


def run_summaries(url: str) -> list[dict[str, Any]]:
    """One row per run from the ``run_summary`` view (the schema must be current)."""
    Catalog(url, create=False)
    res = _query(url, "SELECT * FROM run_summary ORDER BY run_name", max_rows=None, timeout_s=600, sandbox=False)
    return [dict(zip(res.columns, r, strict=True)) for r in res.rows]


def checkpoint_detail(url: str, run: str, step_nr: int) -> dict[str, Any]:
    """Everything the catalog knows about one step of a run: the live (or newest) row, files,
    scores, metadata, pins, state history, and the step's other rows."""
    cat = Catalog(url, create=False)
    info = cat.get_run(run)
    rows = cat.checkpoints(info.id, step_nr=step_nr)
    if not rows:
        raise CheckpointNotFoundError(f"run {run!r} has no checkpoint at step {step_nr}", step_nr=step_nr)
    live = [r for r in rows if r.state in ("committed", "deleting", "corrupt", "missing", "pending")]
    c = live[-1] if live else rows[-1]
    return {
        "run": info.name,
        "checkpoint_dir": info.checkpoint_dir,
        "checkpoint": c,
        "files": cat.shards(c.id, include_removed=True),
        "pins": cat.pinned_steps(info.id).get(step_nr, []),
        "events": cat.events(c.id),
        "other_rows": [r for r in rows if r.id != c.id],
        "model_metadata": info.model_metadata,
    }


# -- plot ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CurvePoint:
    step_nr: int
    value: float
    state: str
    pinned: bool


def metric_curve(url: str, run: str, metric: str) -> list[CurvePoint]:
    """The metric of every checkpoint of the run that still counts (no aborted/pending/superseded rows)."""
    cat = Catalog(url, create=False)
    info = cat.get_run(run)
    pinned = set(cat.pinned_steps(info.id))
    pts = []
    for c in cat.checkpoints(info.id, states=["committed", "deleting", "deleted", "corrupt", "missing"]):
        v = c.scores.get(metric)
        if v is not None and math.isfinite(v):
            pts.append(CurvePoint(c.step_nr, v, c.state, c.step_nr in pinned))
    return pts


_STYLE = {  # state -> (label, marker, face colour, edge colour, size)
    "committed": ("kept", "o", "#1f77b4", "#1f77b4", 42),
    "deleted": ("deleted", "o", "white", "#9a9a9a", 34),
    "deleting": ("deleted", "o", "white", "#9a9a9a", 34),
    "corrupt": ("corrupt / missing", "X", "#d62728", "#d62728", 90),
    "missing": ("corrupt / missing", "X", "#d62728", "#d62728", 90),
}


def plot_metric(
    url: str, run: str, metric: str, output: Path, *, lower_better: bool | None = None, title: str | None = None
) -> list[CurvePoint]:
    """Draw ``metric`` over steps for ``run`` to ``output`` (PNG, SVG or PDF by its suffix).

    Kept checkpoints are filled dots, deleted ones hollow grey, corrupt/missing red crosses,
    pinned ones gold stars; the best kept one is ringed in green when ``lower_better`` is given.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = metric_curve(url, run, metric)
    if not pts:
        raise CheckpointNotFoundError(f"run {run!r} has no checkpoint with a finite {metric!r} score")
    fig, ax = plt.subplots(figsize=(9, 4.8), dpi=110)
    try:
        ax.plot([p.step_nr for p in pts], [p.value for p in pts], color="#4c72b0", alpha=0.45, lw=1.6, zorder=1)
        seen: set[str] = set()
        for state, (label, marker, face, edge, size) in _STYLE.items():
            sel = [p for p in pts if p.state == state]
            if not sel:
                continue
            ax.scatter(
                [p.step_nr for p in sel],
                [p.value for p in sel],
                marker=marker,
                s=size,
                facecolors=face,
                edgecolors=edge,
                linewidths=1.3,
                zorder=3,
                label=None if label in seen else label,
            )
            seen.add(label)
        pinned = [p for p in pts if p.pinned]
        if pinned:
            ax.scatter(
                [p.step_nr for p in pinned],
                [p.value for p in pinned],
                marker="*",
                s=260,
                facecolors="#f2b705",
                edgecolors="#7a5c00",
                linewidths=0.9,
                zorder=4,
                label="pinned",
            )
        if lower_better is not None:
            kept = [p for p in pts if p.state == "committed"] or pts
            best = (min if lower_better else max)(kept, key=lambda p: (p.value, p.step_nr))
            ax.scatter(
                [best.step_nr],
                [best.value],
                marker="o",
                s=230,
                facecolors="none",
                edgecolors="#2ca02c",
                linewidths=2.0,
                zorder=5,
                label=f"best kept: step {best.step_nr} ({best.value:.4g})",
            )
        ax.set_xlabel("step")
        ax.set_ylabel(metric)
        counts = {label: sum(1 for p in pts if _STYLE[p.state][0] == label) for label in ("kept", "deleted")}
        damaged = sum(1 for p in pts if p.state in ("corrupt", "missing"))
        sub = f"{counts['kept']} kept, {counts['deleted']} deleted, {damaged} corrupt/missing, {len(pinned)} pinned"
        direction = "" if lower_better is None else (" (lower is better)" if lower_better else " (higher is better)")
        ax.set_title(title or f"{run}: {metric}{direction}\n{sub}", fontsize=11)
        ax.grid(True, alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
        ax.legend(frameon=False, loc="best", fontsize=9)
        fig.tight_layout()
        fig.savefig(output)
    finally:
        plt.close(fig)
    return pts


__all__ = [
    "CurvePoint",
    "QueryResult",
    "checkpoint_detail",
    "metric_curve",
    "plot_metric",
    "readonly_engine",
    "readonly_query",
    "run_summaries",
]

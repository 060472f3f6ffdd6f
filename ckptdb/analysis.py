"""The analysis surface behind ``ckptdb sql``, ``runs``, ``show`` and ``plot``.

:func:`readonly_query` runs users' SQL on a connection the database itself keeps read-only
(SQLite: ``mode=ro`` plus ``PRAGMA query_only``; PostgreSQL: ``default_transaction_read_only``
plus ``SET TRANSACTION READ ONLY``), so a stray ``DELETE`` is refused by the server, not by a
regular expression. The views it usually reads (``checkpoint_summary``, ``checkpoint_scores``,
``run_summary``) come from migration 0002 and are described in docs/sql.md.
"""

from __future__ import annotations

import math
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, exc
from sqlalchemy.pool import NullPool, QueuePool

from ckptdb.catalog import Catalog
from ckptdb.catalog.session import SQLITE_BUSY_TIMEOUT_MS, masked, parse_url
from ckptdb.errors import CatalogError, CatalogUnavailableError, CheckpointNotFoundError


@dataclass(frozen=True, slots=True)
class QueryResult:
    columns: list[str]
    rows: list[tuple[Any, ...]]


_SQLITE_READ_ACTIONS = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, 33}  # 33: RECURSIVE
_SQLITE_ACTING_PRAGMAS = {"optimize", "wal_checkpoint", "shrink_memory", "incremental_vacuum"}  # act even bare
_SQLITE_READ_PRAGMAS = {"table_info", "table_xinfo", "index_list", "index_info", "index_xinfo", "foreign_key_list"}


def _sqlite_readonly_authorizer(
    action: int, arg1: str | None, arg2: str | None, db: str | None, src: str | None
) -> int:
    """Only reads: blocks ATTACH (creates files), VACUUM INTO (writes a copy) and pragma changes too."""
    if action in _SQLITE_READ_ACTIONS:
        return sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_PRAGMA:
        name = (arg1 or "").lower()
        if name in _SQLITE_READ_PRAGMAS or (arg2 is None and name not in _SQLITE_ACTING_PRAGMAS):
            return sqlite3.SQLITE_OK
    return sqlite3.SQLITE_DENY


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
        return create_engine(
            parsed,
            **pool,
            connect_args={"connect_timeout": 10, "options": "-c default_transaction_read_only=on"},
        )
    raise CatalogUnavailableError(f"catalog {masked(url)}: `ckptdb sql` supports SQLite and PostgreSQL only")


def readonly_query(url: str, sql: str, *, max_rows: int | None = None) -> QueryResult:
    """Run one SQL statement read-only and return its columns and rows.

    Writes (INSERT, UPDATE, DELETE, DDL) are refused by the database and raise
    :class:`CatalogError` whose message says the connection is read-only. Only one statement is
    accepted (several are refused by the driver), so a query cannot switch the session back to
    read-write first.
    """
    engine = readonly_engine(url)
    backend = engine.dialect.name
    try:
        raw = engine.raw_connection()
        try:
            cur = raw.cursor()
            if backend == "postgresql":
                cur.execute("SET TRANSACTION READ ONLY")
                cur.execute("SELECT 1")  # a query ran: the transaction can no longer be made read-write
                # the extended protocol: one statement only, so "...; SET ... READ WRITE; DELETE" is refused
                cur.execute(sql, prepare=True)
            else:
                cur.execute(sql)  # sqlite3 runs one statement only, on a file opened read-only
            columns = [d[0] for d in cur.description] if cur.description else []
            rows = [tuple(r) for r in (cur.fetchmany(max_rows) if max_rows else cur.fetchall())] if columns else []
            cur.close()
            raw.rollback()
        finally:
            raw.close()
    except (sqlite3.Error, exc.DBAPIError, exc.SQLAlchemyError) as e:
        raise _query_error(e, url) from e
    except Exception as e:  # psycopg errors raised through the raw DBAPI cursor
        if type(e).__module__.startswith("psycopg"):
            raise _query_error(e, url) from e
        raise
    finally:
        engine.dispose()
    return QueryResult(columns, rows)


def _query_error(e: BaseException, url: str) -> CatalogError:
    first = (str(getattr(e, "orig", None) or e).strip().splitlines() or [type(e).__name__])[0]
    low = first.lower()
    if any(
        w in low for w in ("readonly", "read-only", "read only", "query_only", "not authorized", "authorization denied")
    ):
        return CatalogError(f"catalog {masked(url)}: `ckptdb sql` is read-only; refused: {first}")
    if "unable to open" in low or ("connection" in low and "failed" in low):
        return CatalogUnavailableError(f"catalog {masked(url)} is unavailable: {first}")
    return CatalogError(f"catalog {masked(url)}: query failed: {first}")


# -- runs / show ---------------------------------------------------------------------------------


def run_summaries(url: str) -> list[dict[str, Any]]:
    """One row per run from the ``run_summary`` view (the schema must be current)."""
    Catalog(url, create=False)
    res = readonly_query(url, "SELECT * FROM run_summary ORDER BY run_name")
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

"""What the pages of ``ckptdb ui`` read: plain SQL over the documented tables and views
(docs/sql.md), on connections the database itself keeps read-only (:func:`ckptdb.analysis.readonly_engine`).

Every query is bounded: lists take ``LIMIT``/``OFFSET``, per-run lookups use the
``(run_id, state, step_nr)`` index, so a page costs the same with 100 000 checkpoints as with 10.
Values come back normalised across backends (timestamps as ``YYYY-MM-DD HH:MM:SS`` UTC text,
booleans as ``bool``, JSON as ``dict``, PostgreSQL's ``Decimal`` sums as ``int``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

from sqlalchemy import text

from ckptdb.analysis import readonly_engine
from ckptdb.catalog import retention_sql
from ckptdb.catalog.session import masked
from ckptdb.errors import CatalogError, CheckpointNotFoundError
from ckptdb.retention import Plan, Policy

PAGE = 50
LIVE_STATES = ("committed", "deleting", "corrupt", "missing", "pending")
CURVE_STATES = ("committed", "deleting", "deleted", "corrupt", "missing")
RUN_SORTS = {  # page's sort key -> ORDER BY (whitelist: no user text reaches the SQL)
    "name": "run_name",
    "committed": "committed DESC, run_name",
    "deleted": "deleted DESC, run_name",
    "damaged": "damaged DESC, run_name",
    "last_step": "last_step DESC, run_name",
    "bytes": "bytes_on_disk DESC, run_name",
    "pins": "pins DESC, run_name",
    "last_commit": "last_committed_at DESC, run_name",
}


def ts(v: Any) -> str | None:
    """A timestamp as UTC text to the second (SQLite stores text, PostgreSQL timestamptz)."""
    if v is None:
        return None
    if isinstance(v, datetime):
        if v.tzinfo is not None:
            v = v.astimezone(timezone.utc)
        return v.strftime("%Y-%m-%d %H:%M:%S")
    return str(v)[:19]


def _val(v: Any) -> Any:
    if isinstance(v, Decimal):
        return int(v) if v == v.to_integral_value() else float(v)
    if isinstance(v, datetime):
        return ts(v)
    return v


def _json(v: Any) -> Any:
    if isinstance(v, str | bytes):
        try:
            return json.loads(v)
        except ValueError:
            return v
    return v


@dataclass(frozen=True, slots=True)
class Page:
    rows: list[dict[str, Any]]
    total: int
    page: int
    size: int = PAGE

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.size))


class UiCatalog:
    """The read-only view of one catalog that the UI serves (one pooled read-only engine)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = readonly_engine(url, pooled=True)
        self.backend: str = self.engine.dialect.name

    def close(self) -> None:
        self.engine.dispose()

    @property
    def display_url(self) -> str:
        return masked(self.url)

    def _no_jit(self, conn: Any) -> None:
        """PostgreSQL's JIT costs more to compile these plans than they take to run (as in retention's query)."""
        if self.backend == "postgresql":
            conn.execute(text("SET LOCAL jit = off"))

    def _rows(self, sql: str, **params: Any) -> list[dict[str, Any]]:
        try:
            with self.engine.connect() as conn:
                self._no_jit(conn)
                res = conn.execute(text(sql), params)
                return [{k: _val(v) for k, v in r.items()} for r in res.mappings()]
        except Exception as e:
            raise CatalogError(f"catalog {self.display_url}: {str(e).splitlines()[0]}") from e

    def _tuples(self, sql: str, **params: Any) -> list[Any]:
        """Plain rows (no per-value normalisation: for long numeric lists such as a chart's points)."""
        try:
            with self.engine.connect() as conn:
                self._no_jit(conn)
                return [tuple(r) for r in conn.execute(text(sql), params)]
        except Exception as e:
            raise CatalogError(f"catalog {self.display_url}: {str(e).splitlines()[0]}") from e

    def _one(self, sql: str, **params: Any) -> dict[str, Any] | None:
        rows = self._rows(sql, **params)
        return rows[0] if rows else None

    # -- live updates ---------------------------------------------------------------------------

    def marker(self) -> str:
        """Changes whenever a checkpoint changes state (every change is an event row) or a pin moves."""
        r = self._one(
            "SELECT (SELECT MAX(id) FROM checkpoint_events) AS e, (SELECT COUNT(*) FROM pins) AS n,"
            " (SELECT MAX(created_at) FROM pins) AS p, (SELECT MAX(id) FROM runs) AS r"
        )
        assert r is not None
        return f"{r['e']}:{r['n']}:{r['p']}:{r['r']}"

    # -- runs -----------------------------------------------------------------------------------

    def runs(self, *, name: str = "", sort: str = "name", page: int = 1) -> Page:
        where, params = "", {}
        if name:
            esc = name.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            where, params = "WHERE name LIKE :pat ESCAPE '\\'", {"pat": f"%{esc}%"}
        total = self._one(f"SELECT COUNT(*) AS n FROM runs {where}", **params)
        order = RUN_SORTS.get(sort, RUN_SORTS["name"])
        page = max(1, page)
        if order == "run_name":  # page the runs first: the view's per-run subqueries run for 50 runs only
            ids = f"SELECT id FROM runs {where} ORDER BY name LIMIT {PAGE} OFFSET {(page - 1) * PAGE}"
            rows = self._rows(f"SELECT * FROM run_summary WHERE run_id IN ({ids}) ORDER BY run_name", **params)
        else:  # an aggregate order needs every run's summary (PostgreSQL: seconds at 1 000 runs; see docs/ui.md)
            rows = self._rows(
                f"SELECT * FROM run_summary WHERE run_id IN (SELECT id FROM runs {where})"
                f" ORDER BY {order} LIMIT {PAGE} OFFSET {(page - 1) * PAGE}",
                **params,
            )
        return Page(rows, int(total["n"]) if total else 0, page)

    def newest_run_name(self) -> str | None:
        r = self._one("SELECT name FROM runs ORDER BY id DESC LIMIT 1")
        return r["name"] if r else None

    def run(self, run_id: int) -> dict[str, Any]:
        r = self._one("SELECT * FROM run_summary WHERE run_id = :id", id=run_id)
        if r is None:
            raise CheckpointNotFoundError(f"no run with id {run_id}")
        meta = self._one("SELECT model_metadata FROM runs WHERE id = :id", id=run_id)
        r["model_metadata"] = _json(meta["model_metadata"]) if meta else None
        return r

    def pins(self, run_id: int) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {}
        for p in self._rows("SELECT step_nr, label FROM pins WHERE run_id = :id ORDER BY label", id=run_id):
            out.setdefault(int(p["step_nr"]), []).append(p["label"])
        return out

    def metrics(self, run_id: int) -> list[str]:
        rows = self._rows(
            "SELECT DISTINCT s.metric FROM scores s JOIN checkpoints c ON c.id = s.checkpoint_id"
            " WHERE c.run_id = :id ORDER BY s.metric",
            id=run_id,
        )
        return [r["metric"] for r in rows]

    def curve(self, run_id: int, metric: str) -> list[dict[str, Any]]:
        """The metric over steps, as ``ckptdb plot`` draws it (:func:`ckptdb.analysis.metric_curve`)."""
        pins = self.pins(run_id)
        rows = self._tuples(
            "SELECT c.step_nr, s.value, c.state FROM checkpoints c"
            " JOIN scores s ON s.checkpoint_id = c.id AND s.metric = :metric"
            " WHERE c.run_id = :id AND c.state IN ('committed', 'deleting', 'deleted', 'corrupt', 'missing')"
            " AND s.value IS NOT NULL ORDER BY c.step_nr, c.id",
            id=run_id,
            metric=metric,
        )
        isfinite = math.isfinite
        return [
            {"step": step, "value": float(v), "state": state, "pins": pins.get(step, [])}
            for step, v, state in rows
            if isfinite(v)
        ]

    def checkpoints(self, run_id: int, *, metric: str, state: str = "", page: int = 1) -> Page:
        """One page of the run's checkpoint rows, newest step first, with save timings."""
        cond, params = "c.run_id = :id", {"id": run_id, "metric": metric}
        if state:
            cond += " AND c.state = :state"
            params["state"] = state
        total = self._one(f"SELECT COUNT(*) AS n FROM checkpoints c WHERE {cond}", **params)
        page = max(1, page)
        # page the ids first: the score lookup then runs for this page's rows only
        rows = self._rows(
            "SELECT c.id, c.step_nr, c.state, c.created_at, c.committed_at, c.total_bytes, c.file_count,"
            " c.verified_at, c.verify_result, c.delete_reason, c.model_preserved, c.world_size,"
            " c.stage_seconds, c.write_seconds, c.sync_seconds, c.commit_seconds, s.raw_value AS value"
            f" FROM (SELECT c.id FROM checkpoints c WHERE {cond} ORDER BY c.step_nr DESC, c.id DESC"
            f" LIMIT {PAGE} OFFSET {(page - 1) * PAGE}) p"
            " JOIN checkpoints c ON c.id = p.id"
            " LEFT JOIN scores s ON s.checkpoint_id = c.id AND s.metric = :metric"
            " ORDER BY c.step_nr DESC, c.id DESC",
            **params,
        )
        for r in rows:
            r["model_preserved"] = bool(r["model_preserved"])
            r["throughput"] = throughput(r)
        return Page(rows, int(total["n"]) if total else 0, page)

    def events(self, run_id: int, *, page: int = 1) -> Page:
        page = max(1, page)
        total = self._one(
            "SELECT COUNT(*) AS n FROM checkpoint_events e JOIN checkpoints c ON c.id = e.checkpoint_id"
            " WHERE c.run_id = :id",
            id=run_id,
        )
        rows = self._rows(
            "SELECT e.id, e.at, c.step_nr, c.id AS checkpoint_id, e.from_state, e.to_state, e.reason, e.host, e.pid"
            " FROM checkpoint_events e JOIN checkpoints c ON c.id = e.checkpoint_id WHERE c.run_id = :id"
            f" ORDER BY e.id DESC LIMIT {PAGE} OFFSET {(page - 1) * PAGE}",
            id=run_id,
        )
        return Page(rows, int(total["n"]) if total else 0, page)

    def last_policy_reason(self, run_id: int) -> str | None:
        r = self._one(
            "SELECT delete_reason FROM checkpoints WHERE run_id = :id AND delete_reason LIKE 'pruned by %'"
            " ORDER BY deleted_at DESC, id DESC LIMIT 1",
            id=run_id,
        )
        return r["delete_reason"] if r else None

    def plan(self, run_id: int, policy: Policy) -> Plan:
        """What ``policy`` would keep (with reasons) and delete: the query ``prune`` decides with, run read-only."""
        q, names = retention_sql.decision_query(run_id, policy.components(), only_delete=False)
        keep: list[int] = []
        delete: list[int] = []
        reasons: dict[int, tuple[str, ...]] = {}
        model_only: list[int] = []
        try:
            with self.engine.connect() as conn:
                self._no_jit(conn)
                for row in conn.execute(q):
                    why = retention_sql.reasons_of(row, names)
                    (keep if why else delete).append(row[1])
                    if why:
                        reasons[row[1]] = why
                    if row[2]:
                        model_only.append(row[1])
        except Exception as e:
            raise CatalogError(f"catalog {self.display_url}: {str(e).splitlines()[0]}") from e
        return Plan(keep, delete, reasons, model_only)

    # -- one checkpoint -------------------------------------------------------------------------

    def checkpoint(self, run_id: int, step_nr: int, row_id: int | None = None) -> dict[str, Any]:
        """One checkpoint row of a step (the live one unless ``row_id``), with files, scores, history."""
        rows = self._rows(
            "SELECT * FROM checkpoints WHERE run_id = :id AND step_nr = :step ORDER BY id", id=run_id, step=step_nr
        )
        if not rows:
            raise CheckpointNotFoundError(f"run {run_id} has no checkpoint at step {step_nr}", step_nr=step_nr)
        chosen = [r for r in rows if r["id"] == row_id] if row_id is not None else []
        live = [r for r in rows if r["state"] in LIVE_STATES]
        c = (chosen or live or rows)[-1]
        c["model_preserved"] = bool(c["model_preserved"])
        c["user_metadata"] = _json(c["user_metadata"])
        c["throughput"] = throughput(c)
        files = self._rows(
            "SELECT path, size_bytes, hash_algorithm, digest, rank, kind, removed_at FROM shards"
            " WHERE checkpoint_id = :cid ORDER BY rank, path",
            cid=c["id"],
        )
        scores = self._rows(
            "SELECT metric, value, raw_value FROM scores WHERE checkpoint_id = :cid ORDER BY metric", cid=c["id"]
        )
        events = self._rows(
            "SELECT at, from_state, to_state, reason, host, pid FROM checkpoint_events"
            " WHERE checkpoint_id = :cid ORDER BY at, id",
            cid=c["id"],
        )
        return {
            "checkpoint": c,
            "files": files,
            "scores": scores,
            "events": events,
            "pins": self.pins(run_id).get(step_nr, []),
            "other_rows": [{"id": r["id"], "state": r["state"], "created_at": r["created_at"]} for r in rows],
        }


def throughput(row: dict[str, Any]) -> float | None:
    """Durable save throughput in bytes/s: ``total_bytes / (write_seconds + sync_seconds)`` (docs/schema.md)."""
    b, w, s = row.get("total_bytes"), row.get("write_seconds"), row.get("sync_seconds")
    if b is None or w is None:
        return None
    secs = float(w) + float(s or 0)
    return float(b) / secs if secs > 0 else None


__all__ = ["PAGE", "Page", "UiCatalog", "throughput", "ts"]

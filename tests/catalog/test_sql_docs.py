"""docs/sql.md cannot rot: every query in it runs here on SQLite and PostgreSQL, and returns rows.
Also: the analysis views' contents, and that `ckptdb sql` is read-only on both backends."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from ckptdb.analysis import readonly_query
from ckptdb.errors import CatalogError
from tests.catalog import sqldata

ROOT = Path(__file__).resolve().parents[2]
BLOCK = re.compile(r"^```sql([^\n]*)\n(.*?)^```", re.S | re.M)


def doc_queries(backend: str) -> list[str]:
    text = (ROOT / "docs" / "sql.md").read_text()
    out = []
    for tag, body in BLOCK.findall(text):
        tag = tag.strip()
        assert tag in ("", "sqlite", "postgresql"), f"unknown sql block tag {tag!r}"
        if tag in ("", backend):
            out.append(body.strip().rstrip(";"))
    return out


def backend_of(url: str) -> str:
    return "sqlite" if make_url(url).get_backend_name() == "sqlite" else "postgresql"


def test_docs_have_queries_for_both_backends() -> None:
    assert len(doc_queries("sqlite")) >= 15
    assert len(doc_queries("sqlite")) == len(doc_queries("postgresql"))


def test_every_documented_query_runs_and_returns_rows(tmp_path: Path, catalog_url: str) -> None:
    sqldata.build(tmp_path, catalog_url)
    queries = doc_queries(backend_of(catalog_url))
    for q in queries:
        res = readonly_query(catalog_url, q)
        assert res.columns, q
        assert res.rows, f"no rows from:\n{q}"
    # spot-check the answers the cookbook promises
    best = dict(
        (r[0], (r[1], r[2]))
        for r in readonly_query(catalog_url, next(q for q in queries if "rank_in_run = 1" in q)).rows
    )
    assert best["exp1"][0] == 600 and best["exp2"] == (30, 1.25)  # 500 is corrupt: not a candidate
    no_commit = readonly_query(catalog_url, next(q for q in queries if "WHERE committed = 0" in q)).rows
    assert [r[0] for r in no_commit] == ["empty-run"]


def test_views(tmp_path: Path, catalog_url: str) -> None:
    sqldata.build(tmp_path, catalog_url)
    q = "SELECT step_nr, state, pinned, bytes_on_disk, score, metric_count FROM checkpoint_summary"
    rows = readonly_query(catalog_url, q + " WHERE run_name = 'exp1' ORDER BY step_nr").rows
    by_step = {r[0]: r for r in rows}
    assert [r[1] for r in rows] == ["deleted", "deleted", "committed", "committed", "corrupt", "committed"]
    assert by_step[300][2] == 1 and by_step[400][2] == 0
    assert by_step[100][3] == 0 and by_step[600][3] > 0
    assert by_step[600][4] == pytest.approx(-1.4) and by_step[600][5] == 2
    runs = readonly_query(
        catalog_url, "SELECT run_name, committed, deleted, damaged, last_step, pins FROM run_summary ORDER BY run_name"
    ).rows
    assert [tuple(r) for r in runs] == [
        ("empty-run", 0, 0, 0, None, 0),
        ("exp1", 3, 2, 1, 600, 1),
        ("exp2", 3, 0, 0, 30, 0),
    ]
    on_disk = readonly_query(catalog_url, "SELECT bytes_on_disk FROM run_summary WHERE run_name = 'exp1'").rows[0][0]
    files = sum(p.stat().st_size for p in (tmp_path / "exp1").glob("step_*/*") if p.name != ".ckptdb_token")
    assert on_disk == files
    nan = readonly_query(
        catalog_url, "SELECT value, raw_value FROM checkpoint_scores WHERE run_name = 'exp2' AND step_nr = 20"
    ).rows
    assert [tuple(r) for r in nan] == [(None, "nan")]


WRITES = [
    "DELETE FROM runs",
    "UPDATE checkpoints SET state = 'deleted'",
    "INSERT INTO pins (run_id, step_nr, label, created_at) VALUES (1, 1, 'x', CURRENT_TIMESTAMP)",
    "CREATE TABLE evil (x INTEGER)",
    "DROP VIEW checkpoint_summary",
]


def test_sql_refuses_writes(tmp_path: Path, catalog_url: str) -> None:
    sqldata.build(tmp_path, catalog_url)
    before = readonly_query(catalog_url, "SELECT COUNT(*) FROM checkpoints").rows[0][0]
    for w in WRITES:
        with pytest.raises(CatalogError, match="read-only"):
            readonly_query(catalog_url, w)
    # a query can't switch read-only off first: one statement per query, and a read-only transaction
    for sneaky in [
        "SET TRANSACTION READ WRITE; DELETE FROM runs",
        "PRAGMA query_only = OFF; DELETE FROM runs",
        "COMMIT; SET default_transaction_read_only = off; DELETE FROM runs",
    ]:
        with pytest.raises(CatalogError):
            readonly_query(catalog_url, sneaky)
    if backend_of(catalog_url) == "postgresql":
        with pytest.raises(CatalogError, match="read-only"):
            readonly_query(
                catalog_url,
                "WITH x AS (SELECT set_config('transaction_read_only', 'off', true)) "
                "DELETE FROM runs WHERE id IN (SELECT 1 FROM x)",
            )
    if backend_of(catalog_url) == "sqlite":  # nor may it create files next to the catalog
        for w in [f"VACUUM INTO '{tmp_path / 'copy.db'}'", f"ATTACH DATABASE '{tmp_path / 'new.db'}' AS x"]:
            with pytest.raises(CatalogError, match="read-only"):
                readonly_query(catalog_url, w)
        assert not (tmp_path / "copy.db").exists() and not (tmp_path / "new.db").exists()
        assert readonly_query(catalog_url, "PRAGMA table_info(runs)").rows
    assert readonly_query(catalog_url, "SELECT COUNT(*) FROM checkpoints").rows[0][0] == before


def test_postgresql_sessions_run_without_jit(tmp_path: Path, catalog_url: str) -> None:
    """`ckptdb sql` and the UI read with PostgreSQL's JIT off: compiling a query over the views took
    several times as long as running it (docs/sql.md)."""
    if backend_of(catalog_url) != "postgresql":
        pytest.skip("PostgreSQL only")
    sqldata.build(tmp_path, catalog_url)
    assert readonly_query(catalog_url, "SELECT current_setting('jit')").rows[0][0] == "off"
    assert readonly_query(catalog_url, "SELECT current_setting('transaction_read_only')").rows[0][0] == "on"

"""`ckptdb ui` over HTTP: nothing can write (every route x POST/PUT/DELETE/PATCH, SQL attacks),
pages answer and paginate, the policy box reads both spellings, the cookbook is docs/sql.md's."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from ckptdb.analysis import readonly_query
from ckptdb.retention import AnyOf, KeepBest, KeepEvery, KeepLast
from tests.ui.conftest import UiServer, free_port

ROOT = Path(__file__).resolve().parents[2]


def http(method: str, url: str, *, host: str | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, method=method, data=b"x=1" if method in ("POST", "PUT", "PATCH") else None)
    if host:
        req.add_header("Host", host)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def snapshot(url: str) -> str:
    """A digest of every row of every table (what a write would change)."""
    h = hashlib.sha256()
    for t in ("runs", "checkpoints", "shards", "scores", "pins", "checkpoint_events", "alembic_version"):
        res = readonly_query(url, f"SELECT * FROM {t} ORDER BY 1")
        h.update(repr((t, res.rows)).encode())
    return h.hexdigest()


def routes(s: UiServer) -> list[str]:
    run = readonly_query(s.url, "SELECT id FROM runs WHERE name = 'exp1'").rows[0][0]
    return [
        "/",
        f"/runs/{run}",
        f"/runs/{run}/plan",
        f"/runs/{run}/steps/300",
        "/sql",
        "/sql.csv?q=SELECT+1",
        "/api/marker",
        f"/api/runs/{run}/curve",
        "/static/app.js",
        "/static/vendor/uPlot.iife.min.js",
        "/nope",
    ]


def test_no_route_writes(ui_server: UiServer) -> None:
    s = ui_server
    before = snapshot(s.url)
    files = sorted((p, p.stat().st_size) for p in s.tmp.rglob("*") if p.is_file() and "catalog.db" not in p.name)
    for path in routes(s):
        status, _ = http("GET", s.base + path)
        assert status == (404 if path == "/nope" else 200), (path, _[-3000:])
        for method in ("POST", "PUT", "DELETE", "PATCH"):
            status, body = http(method, s.base + path)
            assert status == 405 and "read-only" in body, (method, path, status)
    assert snapshot(s.url) == before
    assert (
        sorted((p, p.stat().st_size) for p in s.tmp.rglob("*") if p.is_file() and "catalog.db" not in p.name) == files
    )
    status, _ = http("GET", s.base + "/", host="evil.example")  # DNS rebinding: foreign Host refused
    assert status == 400


ATTACKS = [
    "DELETE FROM checkpoints",
    "UPDATE checkpoints SET state = 'deleted'",
    "INSERT INTO pins (run_id, step_nr, label, created_at) VALUES (1, 1, 'x', '2020-01-01')",
    "DROP TABLE pins",
    "CREATE TABLE evil (a INTEGER)",
    "SELECT 1; DELETE FROM checkpoints",
    "SELECT 1; SET TRANSACTION READ WRITE; DELETE FROM checkpoints",
    "WITH gone AS (DELETE FROM checkpoints RETURNING id) SELECT * FROM gone",
    "PRAGMA journal_mode = DELETE",
    "ATTACH DATABASE '/tmp/ckptdb-ui-evil.db' AS evil",
    "VACUUM INTO '/tmp/ckptdb-ui-evil-copy.db'",
    "COMMIT",
]


def test_sql_attacks_refused(ui_server: UiServer) -> None:
    s = ui_server
    before = snapshot(s.url)
    for attack in ATTACKS:
        status, body = http("GET", s.base + "/sql?" + urllib.parse.urlencode({"q": attack}))
        if attack in ("PRAGMA journal_mode = DELETE", "COMMIT") and status == 200:
            continue  # a no-op on a read-only connection (reported, not refused, by the database)
        assert status == 400 and 'id="sql-error"' in body, (attack, status)
        status, _ = http("GET", s.base + "/sql.csv?" + urllib.parse.urlencode({"q": attack}))
        assert status in (200, 400)
    assert snapshot(s.url) == before
    assert not Path("/tmp/ckptdb-ui-evil.db").exists() and not Path("/tmp/ckptdb-ui-evil-copy.db").exists()


def test_pages_paginate_and_filter(ui_server: UiServer) -> None:
    s = ui_server
    from ckptdb.catalog import Catalog
    from tests.helpers import insert_rows

    cat = Catalog(s.url, create=False)
    for i in range(60):
        insert_rows(cat, f"bulk-{i:03d}", [(1, "committed", {"score": float(i)})] if i % 2 else [])
    _, page1 = http("GET", s.base + "/?name=bulk-")
    assert "page 1 of 2 (60 runs)" in page1 and page1.count('class="run-link"') == 50
    _, page2 = http("GET", s.base + "/?name=bulk-&page=2")
    assert page2.count('class="run-link"') == 10 and "bulk-059" in page2
    _, byc = http("GET", s.base + "/?sort=committed")
    assert byc.index(">exp1<") < byc.index(">bulk-000<")  # 3 committed before 0
    _, none = http("GET", s.base + "/?name=" + urllib.parse.quote("%_x"))
    assert "no run matches" in none
    _, body = http("GET", s.base + "/api/marker")
    marker = json.loads(body)["marker"]
    s.managers["exp2"].begin_checkpoint(40)
    s.managers["exp2"].save_state({"w": 1})
    s.managers["exp2"].commit_checkpoint()
    assert json.loads(http("GET", s.base + "/api/marker")[1])["marker"] != marker


def test_plan_matches_catalog(ui_server: UiServer) -> None:
    s = ui_server
    from ckptdb.catalog import Catalog

    cat = Catalog(s.url, create=False)
    run = cat.get_run("exp1")
    for text, policy in [
        ("--keep-last 1", KeepLast(1)),
        (
            "keep_best(1, metric='valid_loss', lower_better) | keep_every(400)",
            AnyOf(KeepBest(1, metric="valid_loss", lower_better=True), KeepEvery(400)),
        ),
    ]:
        _, body = http("GET", s.base + f"/runs/{run.id}/plan?" + urllib.parse.urlencode({"policy": text}))
        plan = cat.retention_plan(run.id, policy.components())
        assert f'id="plan-keep">{len(plan.keep)}<' in body and f'id="plan-delete">{len(plan.delete)}<' in body
        for step in plan.delete:
            assert f'data-step="{step}" data-action="delete"' in body
    _, bad = http("GET", s.base + f"/runs/{run.id}/plan?policy=--keep-best+2")
    assert "needs --lower-better" in bad
    assert readonly_query(s.url, "SELECT COUNT(*) FROM checkpoints WHERE state = 'committed'").rows[0][0] == 6


def test_policy_spellings() -> None:
    from ckptdb.ui.policy import parse_policy, to_flags

    p = parse_policy("ckptdb prune exp1 --keep-last 2 --keep-best=3 --metric valid_loss --lower-better --keep-every 10")
    assert str(p) == "keep_last(2) | keep_best(3, metric='valid_loss', lower_better) | keep_every(10)"
    assert str(parse_policy("pruned by " + str(p))) == str(p)
    assert parse_policy(to_flags(p)) == p
    for bad in ("", "--keep-best 2", "keep_last(0)", "rm -rf /", "--keep-last x"):
        with pytest.raises(ValueError):
            parse_policy(bad)


def test_cookbook_is_docs_sql_md() -> None:
    from ckptdb.ui import cookbook

    shipped = ROOT / "ckptdb" / "ui" / "cookbook.md"
    assert shipped.read_text() == (ROOT / "docs" / "sql.md").read_text(), "run: cp docs/sql.md ckptdb/ui/cookbook.md"
    ex = cookbook.examples("sqlite", run="o'brien")
    assert len(ex) >= 20 and all(e.dialect in (None, "sqlite") for e in ex)
    assert any("'o''brien'" in e.sql for e in ex)


def test_cli_ui_warns_on_public_host(tmp_path: Path, catalog_url: str) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ckptdb.cli", "ui", "--url", catalog_url, "--host", "0.0.0.0", "--port", str(port)],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        first = proc.stderr.readline()
        assert "warning" in first and "0.0.0.0" in first
        deadline = time.monotonic() + 20
        while True:
            try:
                status, _ = http("GET", f"http://127.0.0.1:{port}/")
                break
            except urllib.error.URLError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        assert status == 200
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stderr is not None:
            proc.stderr.close()


def test_is_loopback() -> None:
    from ckptdb.ui import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1") and is_loopback("127.0.0.2")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2") and not is_loopback("example.com")

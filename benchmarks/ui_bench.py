"""Per-page latency of ``ckptdb ui`` on the retention benchmark's catalog (never a timed test).

Builds the catalog of benchmarks/retention_bench.py (100 000 checkpoints over 1 000 runs; "big":
10 000 committed, "pruned": 10 000 rows of which 20 committed), serves it with uvicorn on a free
loopback port and times each page over HTTP (median and worst of ``--repeat`` requests, warm).
The issue's target: every page under 200 ms.

    .venv/bin/python benchmarks/ui_bench.py [--pg-url postgresql+psycopg://postgres@127.0.0.1:5432/postgres]
        [--checkpoints 100000] [--runs 1000] [--repeat 15]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import uvicorn

from benchmarks.retention_bench import BIG, POLICY, Filler, pg_database
from ckptdb.catalog import Catalog
from ckptdb.catalog.session import dispose_engines
from ckptdb.ui.app import create_app
from ckptdb.ui.policy import to_flags

TARGET_MS = 200.0


def fill(url: str, total: int, runs: int) -> tuple[int, int]:
    f = Filler(Catalog(url))
    big = f.run("big", BIG)
    pruned = f.run("pruned", BIG, committed_from=BIG - 19)
    other = 0
    while f.total < total and f.next_run <= runs:
        left = runs - f.next_run + 1
        f.run(f"run-{other:04d}", max(1, min(-(-(total - f.total) // left), total - f.total)))
        other += 1
    f.analyze()
    print(f"catalog: {f.total} checkpoints, {f.next_run - 1} runs", flush=True)
    return big, pruned


def time_pages(url: str, label: str, big: int, pruned: int, repeat: int) -> list[tuple[str, float, float]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    server = uvicorn.Server(uvicorn.Config(create_app(url), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    base = f"http://127.0.0.1:{port}"
    q = urllib.parse.quote
    pages = {
        "runs (first page)": "/",
        "runs sorted by bytes on disk": "/?sort=bytes",
        "runs page 10": "/?page=10",
        "runs filtered by name": "/?name=run-04",
        "run 'big' (10 000 committed)": f"/runs/{big}",
        "run 'big', checkpoints page 150": f"/runs/{big}?page=150",
        "run 'pruned' (10 000 rows)": f"/runs/{pruned}",
        "plan 'big' (policy entered)": f"/runs/{big}/plan?policy={q(to_flags(POLICY))}",
        "plan 'pruned' (recorded policy)": f"/runs/{pruned}/plan",
        "checkpoint page": f"/runs/{big}/steps/5000",
        "SQL page (empty)": "/sql",
        "SQL: runs at a glance (1 000 rows)": "/sql?q=" + q("SELECT * FROM run_summary ORDER BY run_name"),
        "chart data 'big' (JSON)": f"/api/runs/{big}/curve?metric=valid_loss",
        "live-update marker (JSON)": "/api/marker",
    }
    out = []
    try:
        for name, path in pages.items():
            times = []
            for i in range(repeat + 1):
                t0 = time.perf_counter()
                with urllib.request.urlopen(base + path, timeout=60) as r:
                    r.read()
                    assert r.status == 200, (path, r.status)
                if i:  # the first request warms caches
                    times.append((time.perf_counter() - t0) * 1000)
            med, worst = statistics.median(times), max(times)
            out.append((name, med, worst))
            flag = "" if med < TARGET_MS else f"   <-- over {TARGET_MS:.0f} ms"
            print(f"{label:10s} {name:38s} median {med:7.1f} ms   worst {worst:7.1f} ms{flag}", flush=True)
    finally:
        server.should_exit = True
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pg-url", help="also measure on PostgreSQL (a scratch database is created and dropped)")
    ap.add_argument("--checkpoints", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=15)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'catalog.db'}"
        big, pruned = fill(url, args.checkpoints, args.runs)
        time_pages(url, "SQLite", big, pruned, args.repeat)
        dispose_engines()
    if args.pg_url:
        made = pg_database(args.pg_url)
        if made is None:
            print("PostgreSQL: no server answers; skipped")
            return 0
        url, drop = made
        try:
            big, pruned = fill(url, args.checkpoints, args.runs)
            time_pages(url, "PostgreSQL", big, pruned, args.repeat)
        finally:
            dispose_engines()
            drop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

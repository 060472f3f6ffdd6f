"""The race checker's fast subset (scripts/racecheck.py --quick): 15 (point, second operation) pairs
per backend, every invariant of docs/reliability.md checked after each; about 40 s per
backend here. `make racecheck` runs the whole enumeration."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ckptdb import _hooks

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "racecheck.py"


@pytest.mark.timeout(600)
@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_racecheck_quick(backend: str, tmp_path: Path) -> None:
    pg = os.environ.get("CKPTDB_TEST_PG_URL")
    if backend == "postgres" and not pg:
        pytest.skip("no PostgreSQL given (CKPTDB_TEST_PG_URL)")
    cmd = [sys.executable, str(SCRIPT), "--quick", "--backends", backend, "--root", str(tmp_path / "race")]
    if backend == "postgres":
        cmd += ["--pg-url", str(pg)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=580, env=env, cwd=ROOT)
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    (res,) = summary["results"]
    assert res["violations"] == [], json.dumps(res["violations"], indent=1)[:4000]
    assert res["pairs"] == 15 and res["not_reached"] == 0, res
    assert p.returncode == 0, p.stderr[-3000:]


def test_hook_points_are_noops_until_enabled(tmp_path: Path) -> None:
    _hooks.hook("commit.locked")  # disabled: nothing written, nothing waited for
    assert not list(tmp_path.iterdir())


def test_hook_point_stops_until_released(tmp_path: Path) -> None:
    _hooks.configure(tmp_path, "p.two#2")
    try:
        done: list[str] = []

        def run() -> None:
            _hooks.hook("p.one")
            _hooks.hook("p.two")
            _hooks.hook("p.two")  # the stop
            done.append("yes")

        t = threading.Thread(target=run)
        t.start()
        deadline = time.monotonic() + 10
        while not (tmp_path / "reached").exists() and time.monotonic() < deadline:
            time.sleep(0.005)
        assert (tmp_path / "reached").read_text().strip() == "p.two#2"
        time.sleep(0.05)
        assert not done
        (tmp_path / "release").write_text("go")
        t.join(10)
        assert done == ["yes"]
        assert (tmp_path / "trace").read_text().split() == ["p.one#1", "p.two#1", "p.two#2"]
    finally:
        _hooks.configure(None)

"""Start ``world`` real processes running one worker scenario and collect their results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def launch(
    scenario: str, world: int, tmp_path: Path, *, url: str, timeout: float = 180, **params: Any
) -> list[dict[str, Any]]:
    """Run ``tests.distributed.worker`` as ranks 0..world-1; return each rank's result (and ``rc``).

    A rank that wrote no result (killed, crashed) gets ``{"ok": False, "missing": True}``. Ranks
    still running after ``timeout`` seconds are killed and the test fails: nothing may hang.
    """
    out = tmp_path / f"out-{scenario}-{world}-{time.monotonic_ns()}"
    out.mkdir()
    spec = {
        "scenario": scenario,
        "world": world,
        "dir": str(tmp_path / "ckpt"),
        "url": url,
        "out": str(out),
        "expected": str(tmp_path / "expected.pt"),
        "init_file": str(out / "pg_init"),
        **params,
    }
    spec_file = out / "spec.json"
    spec_file.write_text(json.dumps(spec))
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore::DeprecationWarning",
    }
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.distributed.worker", str(spec_file), str(rank)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(world)
    ]
    deadline = time.monotonic() + timeout
    logs: list[str] = []
    hung = []
    for rank, p in enumerate(procs):
        try:
            logs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
        except subprocess.TimeoutExpired:
            hung.append(rank)
            p.kill()
            logs.append(p.communicate()[0])
    if hung:
        raise AssertionError(f"ranks {hung} of {scenario!r} still running after {timeout}s:\n" + "\n".join(logs))
    results = []
    for rank, p in enumerate(procs):
        f = Path(spec["out"]) / f"rank{rank}.json"
        r: dict[str, Any] = json.loads(f.read_text()) if f.exists() else {"ok": False, "missing": True}
        r["rc"] = p.returncode
        r["log"] = logs[rank][-4000:]
        results.append(r)
    return results


def check_ok(results: list[dict[str, Any]]) -> None:
    bad = {
        r: (res.get("error_type"), res.get("traceback") or res["log"]) for r, res in enumerate(results) if not res["ok"]
    }
    assert not bad, "\n".join(f"rank {r}: {t}\n{tb}" for r, (t, tb) in bad.items())

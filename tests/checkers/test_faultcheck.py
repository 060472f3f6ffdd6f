"""Failed syscalls below Python (issue 11, section 2): the fast subset of scripts/faultcheck and
regression tests for what the full enumeration (``make faultcheck``) found.

- ``test_faultcheck_subset``: the checker itself, N in {1, 2, middle, last} of the main syscalls
  of save, overwrite, delete and recovery (about a minute here; the three tests below about one more).
- ``test_recovery_eio_is_a_checkpoint_error_under_strace``: a real ``strace --inject`` fsync EIO
  in recovery on open used to escape as a bare ``OSError``.
- ``test_sqlite_read_only_fallback_does_not_stick``: a failed create-open of ``catalog.db-shm``
  made SQLite fall back to a read-only shared-memory index that stayed for the whole process (every
  later write: "attempt to write a readonly database").
- ``test_failed_wal_sync_never_comes_back_committed``: the catalog commit's fdatasync of the WAL
  failed (ckptdb said "not committed"), the process died before undoing the publish, and SQLite's
  WAL recovery on the next open replayed the failed transaction: the checkpoint was committed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHECKER = ROOT / "scripts" / "faultcheck" / "faultcheck.py"
CHILD = Path(__file__).with_name("child_fault.py")


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), **extra)
    env.pop("CKPTDB_URL", None)
    return env


def _child(mode: str, d: Path, *, prefix: list[str] | None = None, env: dict[str, str] | None = None) -> str:
    cmd = [*(prefix or []), sys.executable, str(CHILD), mode, str(d)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env or _env(), timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def _need_gcc() -> None:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed (the checker builds its LD_PRELOAD shim)")


def _shim() -> Path:
    _need_gcc()
    sys.path.insert(0, str(CHECKER.parent))
    try:
        import faultcheck

        return faultcheck.build_shim()
    finally:
        sys.path.remove(str(CHECKER.parent))


def test_faultcheck_subset(tmp_path: Path) -> None:
    _need_gcc()
    cmd = [
        sys.executable,
        str(CHECKER),
        "--quick",
        "--protocols",
        "save,overwrite,delete,recovery",
        "--kinds",
        "fsync,fdatasync,rename,openat,unlinkat,write",
        "--dir",
        str(tmp_path / "fc"),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert out.returncode == 0 and summary["violations"] == 0, out.stdout[-6000:] + out.stderr[-3000:]
    assert summary["injected"] >= 50, summary
    assert set(summary["per_protocol"]) == {"save", "overwrite", "delete", "recovery"}


def test_recovery_eio_is_a_checkpoint_error_under_strace(tmp_path: Path) -> None:
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed")
    probe = subprocess.run([strace, "-f", "-qq", "-o", "/dev/null", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"strace cannot trace here: {probe.stderr.strip()}")
    d = tmp_path / "ck"
    _child("debris", d)
    inject = [
        strace,
        "-f",
        "-qq",
        "--seccomp-bpf",
        "-o",
        "/dev/null",
        "-e",
        "trace=fsync",
        "--inject=fsync:error=EIO:when=1",
    ]
    first = _child("open", d, prefix=inject).strip()
    assert first.startswith("ERR CheckpointError: recovery of run 'fault'"), first
    assert "Input/output error" in first and "open the manager again" in first, first
    assert _child("open", d).strip() == "OK"  # no faults: recovery finishes
    state = json.loads(_child("state", d))
    assert state == {"committed": [2], "unfinished": [], "debris": []}, state


def test_sqlite_read_only_fallback_does_not_stick(tmp_path: Path) -> None:
    so = _shim()
    d = tmp_path / "ck"
    _child("debris", d)
    res = json.loads(_child("shm", tmp_path, env=_env(LD_PRELOAD=str(so))).strip().splitlines()[-1])
    assert res["fired"] and res["fired_path"].endswith("catalog.db-shm"), res
    if res["error"] is not None:  # the open may fail, saying so ...
        assert res["error"] == "CatalogUnavailableError", res
    assert res["later"] is None, res  # ... but the process goes on: a later save commits
    state = json.loads(_child("state", d))
    assert state == {"committed": [2, 9], "unfinished": [], "debris": []}, state


def test_failed_wal_sync_never_comes_back_committed(tmp_path: Path) -> None:
    so = _shim()
    d = tmp_path / "ck"
    _child("debris", d)
    assert _child("open", d).strip() == "OK"  # recovery: steps 1 deleted, 2 committed, no debris
    cmd = [sys.executable, str(CHILD), "walsync", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env(LD_PRELOAD=str(so)), timeout=240)
    assert out.returncode == 9 and "FIRED True" in out.stdout, out.stdout + out.stderr
    # the catalog as the next process finds it (SQLite's WAL recovery runs), before ckptdb's recovery
    assert 3 not in json.loads(_child("state", d))["committed"]
    assert _child("open", d).strip() == "OK"
    state = json.loads(_child("state", d))
    assert state == {"committed": [2], "unfinished": [], "debris": []}, state

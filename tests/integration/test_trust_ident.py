"""Writer identity across pid namespaces (issue 10, item 1), with real namespaces.

Containers on one node with host networking share a hostname but not pids. A pending row's writer
is judged by pid only when its host, boot id and pid namespace are all ours; otherwise by its
heartbeat. The writers here run under ``unshare --pid --fork --mount-proc`` (a new pid namespace
with its own /proc, as in a container).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest

from ckptdb import FileCheckpointManager, _proc
from ckptdb.catalog import WriterInfo
from ckptdb.cleanup import gc
from ckptdb.options import RecoveryOptions
from ckptdb.storage import layout
from tests.helpers import assert_state_equal, make_state

CHILD = Path(__file__).with_name("child_ns_writer.py")
UNSHARE = ["unshare", "--pid", "--fork", "--mount-proc"]


def _unshare_unavailable() -> str | None:
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed: cannot create a pid namespace"
    try:
        r = subprocess.run([*UNSHARE, "true"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"`unshare --pid --fork --mount-proc true` failed: {e}"
    if r.returncode != 0:
        return f"`unshare --pid --fork --mount-proc` is not permitted here: {r.stderr.strip()}"
    return None


needs_unshare = pytest.mark.skipif(
    (_why := _unshare_unavailable()) is not None, reason=_why or "unshare --pid is unavailable"
)


def _start(argv: list[str]) -> tuple[subprocess.Popen[str], str]:
    p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout is not None
    line = p.stdout.readline()
    if not line.startswith("READY"):
        p.kill()
        _, err = p.communicate()
        pytest.fail(f"the writer did not get ready: {line!r}\n{err}")
    return p, line


def _pending_row(m: FileCheckpointManager, step: int) -> object:
    rows = [c for c in m.catalog.checkpoints(m.run.id, with_scores=False) if c.step_nr == step]
    assert len(rows) == 1, rows
    return rows[0]


@needs_unshare
def test_live_writer_in_another_pid_namespace_is_not_rolled_back(tmp_path: Path, catalog_url: str) -> None:
    d = tmp_path / "c"
    FileCheckpointManager(d, catalog=catalog_url, run="exp")  # create the run from the host
    p, ready = _start([*UNSHARE, sys.executable, str(CHILD), str(d), catalog_url, "5", "commit"])
    try:
        assert "pid=1 " in ready  # it is the init of its own pid namespace
        # the manager's open (recovery) and a gc leave the live writer alone
        host = FileCheckpointManager(d, catalog=catalog_url, run="exp")
        assert host.last_recovery is not None
        assert host.last_recovery.rolled_back == [] and host.last_recovery.live_writers == [5]
        row = _pending_row(host, 5)
        assert row.state == "pending"  # type: ignore[attr-defined]
        assert row.writer_host == _proc.hostname() and row.writer_boot_id == _proc.boot_id()  # type: ignore[attr-defined]
        assert row.writer_pid_ns is not None and row.writer_pid_ns != _proc.pid_namespace()  # type: ignore[attr-defined]
        tmp = list(d.glob("step_5.tmp-*"))
        assert len(tmp) == 1
        rep = gc(host.catalog, ["exp"])
        assert rep.runs["exp"].rolled_back == [] and rep.runs["exp"].live_writers == [5]
        assert tmp[0].is_dir()
        # the writer commits
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0 and "COMMITTED" in out, (out, err)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    host = FileCheckpointManager(d, catalog=catalog_url, run="exp")
    assert host.get_step_numbers() == [5]
    assert_state_equal(host.load_checkpoint(5), make_state(5))


@needs_unshare
def test_dead_writer_in_another_pid_namespace_is_rolled_back_once_its_heartbeat_is_stale(
    tmp_path: Path, catalog_url: str
) -> None:
    d = tmp_path / "c"
    FileCheckpointManager(d, catalog=catalog_url, run="exp")
    p, _ = _start([*UNSHARE, sys.executable, str(CHILD), str(d), catalog_url, "5", "die"])
    p.communicate(timeout=60)  # the writer (and its namespace) are gone; the row stays pending
    tmp = list(d.glob("step_5.tmp-*"))
    assert len(tmp) == 1
    # its pid means nothing here: with a fresh heartbeat it is still presumed alive
    m = FileCheckpointManager(d, catalog=catalog_url, run="exp")
    assert m.last_recovery is not None and m.last_recovery.rolled_back == [] and m.last_recovery.live_writers == [5]
    assert tmp[0].is_dir()
    # once the heartbeat is older than stale_after, it is rolled back and its directory removed
    time.sleep(1.5)
    m = FileCheckpointManager(
        d, catalog=catalog_url, run="exp", recovery_options=RecoveryOptions(stale_after=timedelta(seconds=1))
    )
    assert m.last_recovery is not None and m.last_recovery.rolled_back == [5]
    assert not tmp[0].exists()
    m.begin_checkpoint(5)  # the step is free again
    m.save_state(make_state(5))
    m.commit_checkpoint()
    assert m.get_step_numbers() == [5]


def test_dead_writer_in_our_namespace_is_rolled_back_at_once(tmp_path: Path, catalog_url: str) -> None:
    d = tmp_path / "c"
    FileCheckpointManager(d, catalog=catalog_url, run="exp")
    p, _ = _start([sys.executable, str(CHILD), str(d), catalog_url, "5", "die"])
    p.communicate(timeout=60)
    m = FileCheckpointManager(d, catalog=catalog_url, run="exp")  # default stale_after: 2 hours
    assert m.last_recovery is not None and m.last_recovery.rolled_back == [5]
    assert not list(d.glob("step_5.tmp-*"))


def _writer(pid: int, start_time: int | None, *, boot_id: str | None, pid_ns: int | None) -> WriterInfo:
    return WriterInfo(_proc.hostname(), pid, start_time, "t", "t", "t", boot_id=boot_id, pid_ns=pid_ns)


def test_pid_is_trusted_only_with_our_host_boot_and_namespace(tmp_path: Path, catalog_url: str) -> None:
    d = tmp_path / "c"
    m = FileCheckpointManager(d, catalog=catalog_url, run="exp")
    cat, run = m.catalog, m.run
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        dead = subprocess.Popen(["true"])
        dead.wait()
        ours = {"boot_id": _proc.boot_id(), "pid_ns": _proc.pid_namespace()}
        rows = {
            # our namespace: pid rules, at once
            1: _writer(dead.pid, None, **ours),  # gone
            2: _writer(sleeper.pid, 12345, **ours),  # the pid now belongs to another process (recycled)
            3: _writer(sleeper.pid, _proc.process_start_time(sleeper.pid), **ours),  # alive
            # unknowable from here: heartbeat rule (fresh), never pid
            4: _writer(dead.pid, None, boot_id=None, pid_ns=None),  # a row written before revision 0004
            5: _writer(dead.pid, None, boot_id=_proc.boot_id(), pid_ns=(_proc.pid_namespace() or 0) + 1),
            6: _writer(dead.pid, None, boot_id="another-boot", pid_ns=_proc.pid_namespace()),
            # this very pid in another container (both trainers are often pid 1): not "this process"
            7: _writer(os.getpid(), None, boot_id=_proc.boot_id(), pid_ns=(_proc.pid_namespace() or 0) + 1),
        }
        for step, w in rows.items():
            tok = f"feed{step:012d}"
            c = cat.begin(run.id, step, tok, f"step_{step}", w, hash_algorithm="xxh3_128", overwrite=False)
            (d / layout.tmp_dir_name(step, c.token)).mkdir()
        rep = m.recover()
        assert rep is not None
        assert sorted(rep.rolled_back) == [1, 2]
        assert sorted(rep.live_writers) == [3, 4, 5, 6, 7]
        for step in (4, 5, 6, 7):
            assert (d / layout.tmp_dir_name(step, f"feed{step:012d}")).is_dir()
        stale = FileCheckpointManager(
            d, catalog=catalog_url, run="exp", recovery_options=RecoveryOptions(stale_after=timedelta(0))
        )
        assert stale.last_recovery is not None
        assert sorted(stale.last_recovery.rolled_back) == [4, 5, 6, 7]
        assert stale.last_recovery.live_writers == [3]
    finally:
        sleeper.send_signal(signal.SIGKILL)
        sleeper.wait()

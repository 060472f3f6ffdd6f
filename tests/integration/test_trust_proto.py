"""Issue 10, items 2-4: the commit / overwrite / delete / recovery protocol under real interleavings,
real injected syscall errors and explicitly built post-power-loss states.

- item 2: a recovery (or a delete) that looked before an overwrite published must not act on what
  it saw: two real processes paused at precise points (tests/integration/child_proto.py);
- item 3: EIO injected by ``strace --inject`` into the publish's renames and directory fsync of a
  real child process: the committed copy stays (or is put back), is never served as the aborted
  payload nor marked corrupt, and reopening finds it committed and intact;
- item 4: the token file is fsynced; recovery never trusts a tokenless ``step_N`` over a
  ``.old-*`` copy and removes a ``.old-*`` copy only when its replacement is committed and verifies.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ckptdb import FileCheckpointManager
from ckptdb.catalog.models import State
from ckptdb.catalog.session import dispose_engines
from ckptdb.recovery import release_token
from tests.helpers import assert_state_equal, make_state, save, work_dirs

CHILD = Path(__file__).with_name("child_proto.py")
ENV = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}


_children: list[Child] = []


@pytest.fixture(autouse=True)
def _reap_children() -> Iterator[None]:
    yield
    while _children:
        _children.pop().close()


class Child:
    """A child process whose stdout lines are read by a thread (so the parent can wait for one)."""

    def __init__(self, mode: str, directory: Path, url: str, sync: Path) -> None:
        _children.append(self)
        self.err = ""
        self.proc = subprocess.Popen(
            [sys.executable, str(CHILD), mode, str(directory), url, str(sync)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.reader.join(timeout=10)
        assert self.proc.stdout is not None and self.proc.stderr is not None
        if self.proc.stderr.closed:
            return
        self.err += self.proc.stderr.read()
        self.proc.stdout.close()
        self.proc.stderr.close()

    def expect(self, prefix: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                if self.proc.poll() is not None:
                    self.close()
                raise AssertionError(f"no {prefix!r} from the child; saw {self.seen}; stderr: {self.err}") from None
            self.seen.append(line)
            if line.startswith(prefix):
                return line

    def finish(self, timeout: float = 120) -> int:
        rc = self.proc.wait(timeout=timeout)
        self.close()
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        return rc


def go(sync: Path, name: str) -> None:
    (sync / name).touch()


def committed_step1(tmp_path: Path, url: str) -> Path:
    d = tmp_path / "ckpt"
    m = FileCheckpointManager(d, catalog=url)
    save(m, 1)  # make_state(1): the copy an overwrite replaces
    m.close()
    dispose_engines()
    return d


def assert_step1_is(d: Path, url: str, seed: int) -> FileCheckpointManager:
    m = FileCheckpointManager(d, catalog=url)
    assert m.get_step_numbers() == [1]
    assert_state_equal(m.load_checkpoint(1, verify="digest"), make_state(seed))
    assert_state_equal(m.load_checkpoint(1, verify="size"), make_state(seed))
    return m


# -- item 2: recovery / delete racing an overwrite ------------------------------------------------


def test_recovery_that_listed_before_an_overwrite_published_leaves_it_alone(tmp_path: Path, catalog_url: str) -> None:
    """R lists the directory and reads the live row while W is between its two renames; W then
    publishes and commits; R must not 'restore' the old copy over the new committed one."""
    d = committed_step1(tmp_path, catalog_url)
    sync = tmp_path / "sync"
    sync.mkdir()
    r = Child("recover", d, catalog_url, sync)
    r.expect("AT R0")  # R has read the pending rows (none yet)
    w = Child("overwrite", d, catalog_url, sync)
    w.expect("AT W1")  # W: step_1 -> step_1.old-T done, tmp not yet renamed
    go(sync, "R0")
    r.expect("AT R1")  # R has listed (.old-T, tmp-T) and read the live row (the old copy's)
    go(sync, "W1")
    w.expect("AT W2")  # W: tmp-T -> step_1 done, catalog commit not yet
    go(sync, "R1")
    try:  # before the fix R acts now; after it R waits for W's run lock
        r.proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    go(sync, "W2")
    assert w.finish() == 0, (w.seen, w.err)
    assert r.finish() == 0, (r.seen, r.err)
    assert "committed 1" in w.seen
    m = assert_step1_is(d, catalog_url, 101)  # the committed overwrite, intact
    assert m.get_checkpoints()[-1].state == State.COMMITTED.value
    assert work_dirs(d) == []


def test_delete_that_read_the_owner_before_an_overwrite_committed_leaves_it_alone(
    tmp_path: Path, catalog_url: str
) -> None:
    """D claims step 1 and reads step_1's owner; W's overwrite then publishes and commits
    (superseding the claimed row); D must not remove the directory that now holds W's copy."""
    d = committed_step1(tmp_path, catalog_url)
    sync = tmp_path / "sync"
    sync.mkdir()
    w = Child("overwrite_wait", d, catalog_url, sync)
    w.expect("AT W0")  # W: pending, files written, commit not yet
    dl = Child("delete", d, catalog_url, sync)
    dl.expect("AT D1")  # D: row 'deleting', step_1's owner read (the old copy's)
    go(sync, "W0")
    try:  # before the fix W commits now; after it W waits for D's run lock
        w.proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    go(sync, "D1")
    assert dl.finish() == 0, (dl.seen, dl.err)
    assert w.finish() == 0, (w.seen, w.err)
    m = assert_step1_is(d, catalog_url, 101)  # W's commit stands, with its files
    states = [c.state for c in m.get_checkpoints()]
    assert states.count(State.COMMITTED.value) == 1
    assert work_dirs(d) == []


# -- item 3: EIO in the publish --------------------------------------------------------------------


def _strace() -> str:
    path = shutil.which("strace")
    if path is None:
        pytest.skip("strace is not installed")
    probe = subprocess.run([path, "-f", "-qq", "-o", "/dev/null", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"strace cannot trace here (ptrace refused): {probe.stderr.strip()}")
    return path


def _run_once(strace: str, d: Path, url: str, opts: list[str]) -> list[str]:
    # --seccomp-bpf: only the traced calls stop the child (plain ptrace stops every call: 2x slower)
    cmd = [strace, "-f", "-qq", "--seccomp-bpf", *opts, sys.executable, str(CHILD), "overwrite_once", str(d), url]
    p = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert p.returncode == 0, (p.stdout, p.stderr[-3000:])
    return p.stdout.splitlines()


def _main_thread_calls(strace: str, tmp_path: Path, url: str) -> tuple[list[str], list[str]]:
    """Dry run under strace (a copy of the same state): the main thread's rename and fsync calls, in order."""
    d = committed_step1(tmp_path / "dry", url)
    trace = tmp_path / "trace.txt"
    out = _run_once(strace, d, url, ["-y", "-e", "trace=rename,renameat,renameat2,fsync", "-o", str(trace)])
    assert "committed 1" in out
    pid = next(line.split()[1] for line in out if line.startswith("PID "))
    renames, fsyncs = [], []
    for line in trace.read_text().splitlines():
        tid, _, call = line.partition(" ")
        call = call.strip()
        if tid != pid or "resumed>" in call:
            continue
        if call.startswith("rename"):
            renames.append(call)
        elif call.startswith("fsync("):
            fsyncs.append(call)
    return renames, fsyncs


@pytest.mark.parametrize("point", ["rename-aside", "rename-publish", "dir-fsync", "rename-publish+restore"])
def test_eio_in_the_publish_keeps_the_committed_copy(tmp_path: Path, catalog_url: str, point: str) -> None:
    strace = _strace()
    renames, fsyncs = _main_thread_calls(strace, tmp_path, catalog_url)
    assert len(renames) >= 2 and renames[0].startswith(renames[1].split("(")[0]), renames
    call = renames[0].split("(")[0]  # rename or renameat2, whichever this libc uses
    if point == "dir-fsync":
        d_name = str(tmp_path / "dry" / "ckpt")
        idx = [i for i, f in enumerate(fsyncs) if re.match(rf"fsync\(\d+<{re.escape(d_name)}>\)", f)]
        # the checkpoint directory's fsync right after the publish renames
        inject = f"fsync:error=EIO:when={idx[-1] + 1}"
    else:
        when = {"rename-aside": "1", "rename-publish": "2", "rename-publish+restore": "2..3"}[point]
        inject = f"{call}:error=EIO:when={when}"
    d = committed_step1(tmp_path, catalog_url)
    out = _run_once(strace, d, catalog_url, ["-o", "/dev/null", "-e", f"trace={call},fsync", f"--inject={inject}"])
    err = next((line for line in out if line.startswith("ERROR ")), None)
    assert err is not None, out
    assert "Input/output error" in err and "intact" in err, err
    if point == "rename-publish+restore":
        assert ".old-" in err and "moves it back" in err, err  # says where the committed copy is
    # in the failing process: never the aborted payload, never damage recorded
    assert "LOAD size new" not in out and "LOAD digest new" not in out, out
    if point != "rename-publish+restore":
        assert "LOAD size old" in out and "LOAD digest old" in out, out
    m = FileCheckpointManager(d, catalog=catalog_url)
    assert m.get_step_numbers() == [1]
    assert [c.state for c in m.get_checkpoints() if c.step_nr == 1].count(State.COMMITTED.value) == 1
    assert_state_equal(m.load_checkpoint(1, verify="digest"), make_state(1))
    assert work_dirs(d) == []
    # and the step can be overwritten again
    save(m, 1, overwrite=True)
    assert_step1_is(d, catalog_url, 1)


def test_token_file_is_fsynced(tmp_path: Path, catalog_url: str) -> None:
    strace = _strace()
    _, fsyncs = _main_thread_calls(strace, tmp_path, catalog_url)
    assert any(".ckptdb_token>" in f for f in fsyncs), fsyncs


# -- item 4: post-power-loss states of an overwrite -------------------------------------------------


def _interrupted_overwrite(d: Path, url: str, *, after: str) -> tuple[FileCheckpointManager, str]:
    """Begin an overwrite of step 1 with make_state(101) and stop it like a power loss would:
    'pending' (publish renames done, catalog commit not) or 'committed' (old copy not yet removed).
    The writer is then dead (its manager gone). Returns a fresh manager that has not recovered yet
    (recovery_options.on_open=False) and the overwrite's token."""
    from ckptdb.options import RecoveryOptions

    m = FileCheckpointManager(d, catalog=url)
    backup = d.parent / "backup_step_1"
    shutil.copytree(d / "step_1", backup)
    m.begin_checkpoint(1, overwrite=True)
    m.save_state(make_state(101))
    assert m._open is not None
    token = m._open.token
    if after == "committed":
        m.commit_checkpoint()
        shutil.copytree(backup, d / f"step_1.old-{token}")  # the old copy, not yet removed
    else:
        m._open.writer.finalize()
        (d / "step_1").rename(d / f"step_1.old-{token}")
        (d / f"step_1.tmp-{token}").rename(d / "step_1")
        m._open = None
    release_token(token)  # the writer is dead
    shutil.rmtree(backup)
    m2 = FileCheckpointManager(d, catalog=url, recovery_options=RecoveryOptions(on_open=False))
    return m2, token


@pytest.mark.parametrize("after", ["pending", "committed"])
def test_tokenless_new_copy_beside_old_copy(tmp_path: Path, catalog_url: str, after: str) -> None:
    """Power loss took the new step_1's token file: recovery must keep the committed data."""
    d = committed_step1(tmp_path, catalog_url)
    m, token = _interrupted_overwrite(d, catalog_url, after=after)
    (d / "step_1" / ".ckptdb_token").unlink()
    rep = m.recover()
    assert rep is not None
    if after == "pending":  # the old copy is the committed one: moved back, the new copy removed
        assert rep.restored == [1], rep
        assert_step1_is(d, catalog_url, 1)
    else:  # the new copy is committed and verifies: the old copy goes
        assert f"step_1.old-{token}" in rep.removed, rep
        assert_step1_is(d, catalog_url, 101)
    assert work_dirs(d) == []


def test_old_copy_kept_when_the_committed_replacement_does_not_verify(tmp_path: Path, catalog_url: str) -> None:
    """The overwrite committed but its files are truncated (power loss): the .old copy is never deleted."""
    d = committed_step1(tmp_path, catalog_url)
    m, token = _interrupted_overwrite(d, catalog_url, after="committed")
    victim = d / "step_1" / "rank_0.pt"
    victim.write_bytes(victim.read_bytes()[:100])
    (d / "step_1" / ".ckptdb_token").unlink()
    rep = m.recover()
    old = d / f"step_1.old-{token}"
    assert old.is_dir(), rep
    assert rep is not None and f"step_1.old-{token}" in rep.kept, rep
    # the set-aside data is the whole committed copy of before
    import torch

    assert_state_equal(
        torch.load(old / "model.pt", weights_only=True)["model"],
        make_state(1)["model"],
    )
    # and a second recovery keeps it too
    again = FileCheckpointManager(d, catalog=catalog_url)
    assert again.last_recovery is not None and old.is_dir()


def test_truncated_uncommitted_new_copy_beside_old_copy(tmp_path: Path, catalog_url: str) -> None:
    d = committed_step1(tmp_path, catalog_url)
    m, _ = _interrupted_overwrite(d, catalog_url, after="pending")
    victim = d / "step_1" / "rank_0.pt"
    victim.write_bytes(b"")
    rep = m.recover()
    assert rep is not None and rep.restored == [1]
    assert_step1_is(d, catalog_url, 1)
    assert work_dirs(d) == []

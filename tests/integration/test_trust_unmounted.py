"""Issue 10, item 6: an unmounted checkpoint directory is never taken for lost checkpoints.

A real mount: a tmpfs ("the disk") is bind-mounted on the run's checkpoint directory. Checkpoints
are saved through the mount, the bind mount is unmounted (an empty mount point is left) or the mount
point is renamed away entirely; ``ckptdb gc`` and ``ckptdb verify`` (subprocesses) must exit 2
naming the problem and change no row; a manager opened there must change nothing either. After
remounting, checkpoints made ``missing`` by removing their files (then restoring them) heal when a
manager opens the run. SQLite and PostgreSQL.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ckptdb import CheckpointNotFoundError, FileCheckpointManager
from ckptdb.catalog import Catalog
from ckptdb.cleanup import gc
from ckptdb.errors import CheckpointDirUnavailableError
from ckptdb.verify import verify
from tests.helpers import assert_state_equal, make_state, save, sql


def _mount(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mount", *args], capture_output=True, text=True, timeout=30)


def _umount(path: Path) -> None:
    subprocess.run(["umount", str(path)], capture_output=True, text=True, timeout=30, check=True)


class Disk:
    """A tmpfs holding the checkpoints, bind-mounted on the run's checkpoint directory."""

    def __init__(self, root: Path) -> None:
        self.disk = root / "disk"
        self.mnt = root / "mnt"
        self.disk.mkdir()
        self.mnt.mkdir()
        p = _mount("-t", "tmpfs", "-o", "size=64m", "tmpfs", str(self.disk))
        if p.returncode != 0:
            pytest.skip(f"mounting a tmpfs is not permitted here: {p.stderr.strip()}")
        (self.disk / "data").mkdir()
        self.mounted = False
        self.mount()

    def mount(self) -> None:
        p = _mount("--bind", str(self.disk / "data"), str(self.mnt))
        assert p.returncode == 0, p.stderr
        self.mounted = True

    def umount(self) -> None:
        _umount(self.mnt)
        self.mounted = False

    def close(self) -> None:
        import gc as pygc

        pygc.collect()  # mmapped tensors of loaded checkpoints keep files open
        for path, on in ((self.mnt, self.mounted), (self.disk, True)):
            if on and subprocess.run(["umount", str(path)], capture_output=True, timeout=30).returncode != 0:
                subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30, check=True)


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Disk]:
    d = Disk(tmp_path)
    try:
        yield d
    finally:
        d.close()


def rows(url: str) -> list[tuple]:
    """Everything gc / verify could change: states, verify results, events."""
    ck = sql(url, "SELECT id, step_nr, state, verify_result, verified_at FROM checkpoints ORDER BY id")
    ev = sql(url, "SELECT count(*) FROM checkpoint_events")
    return [*ck, *ev]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ckptdb.cli", *args], capture_output=True, text=True, timeout=120, env=dict(os.environ)
    )


@pytest.fixture
def saved(disk: Disk, catalog_url: str) -> FileCheckpointManager:
    m = FileCheckpointManager(disk.mnt, catalog=catalog_url, run="exp")
    for step in (10, 20, 30):
        save(m, step, score=float(step))
    return m


def _refusals(catalog_url: str, mnt: Path, what: str) -> None:
    before = rows(catalog_url)
    for args in (["gc", "--json"], ["verify", "exp", "--size-only"]):
        p = cli(args[0], "--url", catalog_url, *args[1:])
        assert p.returncode == 2, (args, p.stdout, p.stderr)
        assert what in p.stderr and str(mnt) in p.stderr and "nothing was changed" in p.stderr, p.stderr
        assert rows(catalog_url) == before, args
    with pytest.raises(CheckpointDirUnavailableError, match=what):
        verify(Catalog(catalog_url), run="exp")
    rep = gc(Catalog(catalog_url))
    assert "exp" in rep.refused and not rep.runs and not rep.ok
    # a manager opening the run there only reports; loads mark nothing either
    m = FileCheckpointManager(mnt, catalog=catalog_url, run="exp")
    assert m.last_recovery is not None and m.last_recovery.unavailable and what in m.last_recovery.unavailable
    with pytest.raises(CheckpointNotFoundError):
        m.load_last_checkpoint()
    m.keep_last_n_checkpoints(1)  # retention judges nothing there either
    assert rows(catalog_url) == before
    assert m.get_step_numbers() == [10, 20, 30]


def test_gc_and_verify_refuse_an_empty_mount_point(saved: FileCheckpointManager, disk: Disk, catalog_url: str) -> None:
    disk.umount()
    assert list(disk.mnt.iterdir()) == []  # the mount point is left, empty
    _refusals(catalog_url, disk.mnt, "holds none of them")
    disk.mount()
    m = FileCheckpointManager(disk.mnt, catalog=catalog_url, run="exp")
    step, state = m.load_last_checkpoint()
    assert step == 30
    assert_state_equal(state, make_state(30))


def test_gc_and_verify_refuse_an_absent_directory(saved: FileCheckpointManager, disk: Disk, catalog_url: str) -> None:
    disk.umount()
    aside = disk.mnt.with_name("mnt-aside")
    disk.mnt.rename(aside)
    p = cli("gc", "--url", catalog_url)
    assert p.returncode == 2 and "does not exist" in p.stderr, p.stderr
    before = rows(catalog_url)
    p = cli("verify", "--url", catalog_url)
    assert p.returncode == 2 and "does not exist" in p.stderr, p.stderr
    assert rows(catalog_url) == before
    with pytest.raises(CheckpointDirUnavailableError, match="does not exist"):
        verify(Catalog(catalog_url))
    assert not disk.mnt.exists()
    disk.mnt.mkdir()  # an empty directory in its place (as a manager opening there would create)
    _refusals(catalog_url, disk.mnt, "holds none of them")
    disk.mnt.rmdir()
    aside.rename(disk.mnt)
    disk.mount()
    assert FileCheckpointManager(disk.mnt, catalog=catalog_url, run="exp").load_last_checkpoint()[0] == 30


def test_force_judges_anyway(saved: FileCheckpointManager, disk: Disk, catalog_url: str) -> None:
    disk.umount()
    p = cli("gc", "--url", catalog_url, "--force")
    assert p.returncode == 1, p.stderr  # ran, and found every checkpoint gone
    assert sorted(
        s for _, s, st, *_ in sql(catalog_url, "SELECT id, step_nr, state FROM checkpoints") if st == "missing"
    ) == [
        10,
        20,
        30,
    ]
    disk.mount()  # and they heal when the files are back
    m = FileCheckpointManager(disk.mnt, catalog=catalog_url, run="exp")
    assert m.last_recovery is not None and sorted(m.last_recovery.healed) == [10, 20, 30]
    assert m.get_step_numbers() == [10, 20, 30]


def test_missing_checkpoints_heal_when_their_files_come_back(
    saved: FileCheckpointManager, disk: Disk, catalog_url: str, tmp_path: Path
) -> None:
    backup = tmp_path / "backup"
    backup.mkdir()
    for step in (20, 30):
        shutil.move(disk.mnt / f"step_{step}", backup / f"step_{step}")
    p = cli("gc", "--url", catalog_url)  # step_10 is still there: the directory is judged
    assert p.returncode == 1, p.stderr
    assert dict(sql(catalog_url, "SELECT step_nr, state FROM checkpoints")) == {
        10: "committed",
        20: "missing",
        30: "missing",
    }
    # restore step 30 intact and step 20 altered (same size, other bytes)
    disk.umount()
    disk.mount()  # a real remount on the way
    shutil.move(backup / "step_30", disk.mnt / "step_30")
    shutil.move(backup / "step_20", disk.mnt / "step_20")
    rank = disk.mnt / "step_20" / "rank_0.pt"
    data = bytearray(rank.read_bytes())
    data[-100] ^= 1
    rank.write_bytes(bytes(data))

    m = FileCheckpointManager(disk.mnt, catalog=catalog_url, run="exp")
    assert m.last_recovery is not None and m.last_recovery.healed == [30]
    assert dict(sql(catalog_url, "SELECT step_nr, state FROM checkpoints")) == {
        10: "committed",
        20: "corrupt",
        30: "committed",
    }
    (reason,) = sql(
        catalog_url,
        "SELECT e.reason FROM checkpoint_events e JOIN checkpoints c ON c.id = e.checkpoint_id "
        "WHERE c.step_nr = 30 AND e.from_state = 'missing' AND e.to_state = 'committed'",
    )[0]
    assert "files are back" in reason
    step, state = m.load_last_checkpoint()
    assert step == 30
    assert_state_equal(state, make_state(30))

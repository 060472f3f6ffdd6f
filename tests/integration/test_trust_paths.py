"""Issue 10, item 5: a catalog row never leads outside ``checkpoint_dir/step_<N>/``.

Rows are tampered with through SQL (as anyone with write access to the catalog could), on SQLite
and PostgreSQL: a checkpoint's ``directory`` set to ``../victim`` or an absolute path, a shard's
``path`` set to ``../x`` or an absolute path, and a symbolic link in a step directory pointing
outside. Every consumer (load, load_last_checkpoint's fallback, load_metadata, delete, retention,
recovery / gc, verify, load_model / ``ckptdb export``) refuses with ``CheckpointCorruptError`` and
nothing outside is removed or read (the victims hold valid copies of the checkpoint's files, so
following the path would *succeed* instead of failing).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from ckptdb import CheckpointCorruptError, FileCheckpointManager, load_model
from ckptdb.catalog import Catalog
from ckptdb.cleanup import gc
from ckptdb.storage import layout
from ckptdb.verify import verify
from tests.helpers import assert_state_equal, make_state, save, sql


def execute(url: str, q: str, **params: object) -> None:
    """One tampering statement, committed (a user's UPDATE through their own connection)."""
    engine = create_engine(url)
    try:
        with engine.begin() as c:
            c.execute(text(q), params)
    finally:
        engine.dispose()


def set_directory(url: str, step: int, directory: str) -> None:
    execute(
        url,
        "UPDATE checkpoints SET directory = :d WHERE step_nr = :s AND state IN ('committed', 'deleting')",
        d=directory,
        s=step,
    )


def set_shard_path(url: str, step: int, old: str, new: str) -> None:
    execute(
        url,
        "UPDATE shards SET path = :new WHERE path = :old AND checkpoint_id IN "
        "(SELECT id FROM checkpoints WHERE step_nr = :s AND state = 'committed')",
        new=new,
        old=old,
        s=step,
    )


def state_of(url: str, step: int) -> str:
    rows = sql(url, "SELECT state FROM checkpoints WHERE step_nr = :s AND state <> 'aborted'", s=step)
    assert len(rows) == 1, rows
    return str(rows[0][0])


def snapshot(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture
def mgr(tmp_path: Path, catalog_url: str) -> FileCheckpointManager:
    m = FileCheckpointManager(tmp_path / "ckpt", catalog=catalog_url, run="exp")
    for step in (10, 20, 30):
        save(m, step, score=float(step))
    return m


VICTIMS = ["relative", "absolute"]


@pytest.fixture(params=VICTIMS)
def victim(request: pytest.FixtureRequest, mgr: FileCheckpointManager, tmp_path: Path) -> tuple[str, Path]:
    """(the directory value to write into a row, the victim directory it names).

    The victim holds an exact copy of step 30's files (token included): a consumer that followed
    the row would find everything matching and succeed.
    """
    if request.param == "relative":
        path, value = tmp_path / "victim", "../victim"
    else:
        path = tmp_path / "abs_victim"
        value = str(path)
    shutil.copytree(mgr.checkpoint_dir / "step_30", path)
    (path / "precious.txt").write_text("not ckptdb's")
    return value, path


# -- the layout's validating functions -------------------------------------------------------------


def test_step_path_accepts_only_the_rows_own_step_dir(tmp_path: Path) -> None:
    assert layout.step_path(tmp_path, 7, "step_7") == tmp_path / "step_7"
    for bad in ("../victim", "/abs/victim", "step_8", "step_7/..", "step_7/", "", "./step_7", "step_07"):
        with pytest.raises(CheckpointCorruptError) as ei:
            layout.step_path(tmp_path, 7, bad)
        assert ei.value.step_nr == 7 and "refused" in str(ei.value)
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "step_7").symlink_to(outside)
    with pytest.raises(CheckpointCorruptError, match="symbolic link"):
        layout.step_path(tmp_path, 7, "step_7")


def test_shard_path_resolves_inside_the_step_dir(tmp_path: Path) -> None:
    step = tmp_path / "step_1"
    (step / "sharded").mkdir(parents=True)
    (tmp_path / "x").write_text("outside")
    (step / "inner.pt").write_text("in")
    assert layout.shard_path(step, "sharded/a.distcp", 1) == step / "sharded" / "a.distcp"
    os.symlink(step / "inner.pt", step / "alias.pt")  # a link that stays inside is fine
    assert layout.shard_path(step, "alias.pt", 1) == step / "alias.pt"
    os.symlink(tmp_path / "x", step / "model.pt")
    os.symlink(tmp_path, step / "up")
    for bad in ("../x", "/etc/passwd", "sharded/../../x", "", "model.pt", "up/x", "a\x00b"):
        with pytest.raises(CheckpointCorruptError) as ei:
            layout.shard_path(step, bad, 1)
        assert "refused" in str(ei.value)


# -- directory leading outside -------------------------------------------------------------------------


def test_delete_never_removes_a_directory_outside(
    mgr: FileCheckpointManager, catalog_url: str, victim: tuple[str, Path]
) -> None:
    value, path = victim
    before = snapshot(path)
    set_directory(catalog_url, 20, value)
    with pytest.raises(CheckpointCorruptError) as ei:
        mgr.delete_checkpoint(20)
    assert value in str(ei.value)
    assert snapshot(path) == before  # untouched
    assert (mgr.checkpoint_dir / "step_20").is_dir()  # nothing removed anywhere
    assert state_of(catalog_url, 20) == "corrupt"  # recorded, so resume skips it


def test_load_refuses_the_row_and_resume_falls_back(
    mgr: FileCheckpointManager, catalog_url: str, victim: tuple[str, Path]
) -> None:
    value, _ = victim
    set_directory(catalog_url, 30, value)
    with pytest.raises(CheckpointCorruptError, match="refused"):
        mgr.load_checkpoint(30)
    assert state_of(catalog_url, 30) == "corrupt"
    execute(catalog_url, "UPDATE checkpoints SET state = 'committed' WHERE step_nr = 30 AND state = 'corrupt'")
    step, state = mgr.load_last_checkpoint()
    assert step == 20  # not 30 read from the victim
    assert_state_equal(state, make_state(20))
    with pytest.raises(CheckpointCorruptError):
        mgr.load_metadata(30)


def test_retention_never_removes_a_directory_outside(
    mgr: FileCheckpointManager, catalog_url: str, victim: tuple[str, Path]
) -> None:
    value, path = victim
    before = snapshot(path)
    set_directory(catalog_url, 10, value)
    deleted = mgr.keep_last_n_checkpoints(1)
    assert deleted == [20]  # step 10 is refused: left 'deleting', its files untouched
    assert snapshot(path) == before
    assert state_of(catalog_url, 10) == "deleting"
    assert (mgr.checkpoint_dir / "step_10").is_dir()


def test_recovery_and_gc_never_follow_a_deleting_row_outside(
    mgr: FileCheckpointManager, catalog_url: str, victim: tuple[str, Path]
) -> None:
    value, path = victim
    before = snapshot(path)
    set_directory(catalog_url, 20, value)
    execute(catalog_url, "UPDATE checkpoints SET state = 'deleting' WHERE step_nr = 20 AND state = 'committed'")
    m2 = FileCheckpointManager(mgr.checkpoint_dir, catalog=catalog_url, run="exp")  # recovery on open
    assert m2.last_recovery is not None and m2.last_recovery.unsafe_paths
    rep = gc(Catalog(catalog_url), ["exp"])
    assert not rep.ok and rep.runs["exp"].unsafe_paths and value in rep.runs["exp"].unsafe_paths[0]
    assert snapshot(path) == before
    assert state_of(catalog_url, 20) == "deleting"
    assert m2.load_last_checkpoint()[0] == 30


def test_gc_marks_a_committed_row_leading_outside_corrupt(
    mgr: FileCheckpointManager, catalog_url: str, victim: tuple[str, Path]
) -> None:
    value, path = victim
    before = snapshot(path)
    set_directory(catalog_url, 20, value)
    rep = gc(Catalog(catalog_url), ["exp"])
    assert rep.runs["exp"].unsafe_paths and not rep.runs["exp"].marked_missing
    assert state_of(catalog_url, 20) == "corrupt"
    assert snapshot(path) == before


def test_verify_judges_the_row_without_reading_outside(
    mgr: FileCheckpointManager, catalog_url: str, victim: tuple[str, Path]
) -> None:
    value, _ = victim
    set_directory(catalog_url, 30, value)
    report = verify(Catalog(catalog_url), run="exp")
    (bad,) = report.bad
    assert bad.step_nr == 30 and bad.result == "corrupt" and bad.files_checked == 0
    assert [p.problem for p in bad.problems] == ["unsafe"] and bad.problems[0].path == value
    assert state_of(catalog_url, 30) == "corrupt"


def test_load_model_and_export_refuse_a_row_leading_outside(
    mgr: FileCheckpointManager, catalog_url: str, victim: tuple[str, Path], tmp_path: Path
) -> None:
    value, _ = victim
    set_directory(catalog_url, 30, value)
    out = tmp_path / "m.safetensors"
    proc = subprocess.run(
        [sys.executable, "-m", "ckptdb.cli", "export", "--url", catalog_url, "exp", "--step", "30", "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "refused" in proc.stderr and value in proc.stderr
    assert not out.exists()
    shown = subprocess.run(
        [sys.executable, "-m", "ckptdb.cli", "show", "--url", catalog_url, "exp", "30"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shown.returncode == 0 and "unsafe directory" in shown.stdout, shown.stderr
    with pytest.raises(CheckpointCorruptError):
        load_model(catalog_url, run="exp", select=30)
    assert state_of(catalog_url, 30) == "corrupt"


# -- shard paths leading outside -----------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["../x", "/abs"])
def test_shard_path_outside_is_corrupt_and_resume_falls_back(
    mgr: FileCheckpointManager, catalog_url: str, tmp_path: Path, bad: str
) -> None:
    target = mgr.checkpoint_dir / "x" if bad == "../x" else tmp_path / "abs_x"
    shutil.copy(mgr.checkpoint_dir / "step_30" / "rank_0.pt", target)  # a valid copy: following it would work
    value = bad if bad == "../x" else str(target)
    set_shard_path(catalog_url, 30, "rank_0.pt", value)
    with pytest.raises(CheckpointCorruptError, match="refused"):  # before: a bare ValueError
        mgr.load_checkpoint(30)
    assert state_of(catalog_url, 30) == "corrupt"
    execute(catalog_url, "UPDATE checkpoints SET state = 'committed' WHERE step_nr = 30 AND state = 'corrupt'")
    step, state = mgr.load_last_checkpoint()
    assert step == 20
    assert_state_equal(state, make_state(20))
    report = verify(Catalog(catalog_url), run="exp", include_damaged=True)
    assert [p.problem for p in report.bad[0].problems if p.path == value] == ["unsafe"]


def test_symlink_in_a_step_dir_pointing_outside_is_never_followed(
    mgr: FileCheckpointManager, catalog_url: str, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    rank = mgr.checkpoint_dir / "step_30" / "rank_0.pt"
    shutil.move(rank, outside / "rank_0.pt")
    rank.symlink_to(outside / "rank_0.pt")  # same bytes, same size, same digest: but outside
    with pytest.raises(CheckpointCorruptError, match="outside"):
        mgr.load_checkpoint(30, verify="size")
    execute(catalog_url, "UPDATE checkpoints SET state = 'committed' WHERE step_nr = 30 AND state = 'corrupt'")
    assert mgr.load_last_checkpoint()[0] == 20
    report = verify(Catalog(catalog_url), run="exp", include_damaged=True)
    assert {p.problem for p in report.bad[0].problems} == {"unsafe"}
    # deleting it removes the link, never what it points to
    mgr.delete_checkpoint(30)
    assert (outside / "rank_0.pt").is_file()


def test_step_dir_symlinked_outside_is_refused(mgr: FileCheckpointManager, catalog_url: str, tmp_path: Path) -> None:
    outside = tmp_path / "moved"
    shutil.move(mgr.checkpoint_dir / "step_30", outside)
    (mgr.checkpoint_dir / "step_30").symlink_to(outside)
    with pytest.raises(CheckpointCorruptError, match="symbolic link"):
        mgr.load_checkpoint(30)
    with pytest.raises(CheckpointCorruptError):
        mgr.delete_checkpoint(30)
    assert (outside / layout.TOKEN_FILE).is_file() and (outside / "rank_0.pt").is_file()

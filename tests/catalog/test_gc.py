"""`ckptdb gc` and the cleanup module: dry run first, then the real thing, on a real catalog."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from ckptdb import FileCheckpointManager, _proc
from ckptdb.catalog import WriterInfo
from ckptdb.cleanup import gc
from ckptdb.cli import main
from ckptdb.storage import layout
from tests.helpers import make_state, save


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def state_of(url: str, step: int) -> str:
    engine = create_engine(url)
    try:
        with engine.connect() as c:
            return str(
                c.execute(
                    text("SELECT state FROM checkpoints WHERE step_nr = :s ORDER BY id DESC LIMIT 1"), {"s": step}
                ).scalar_one()
            )
    finally:
        engine.dispose()


def test_gc_dry_run_then_for_real(tmp_path: Path, catalog_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "c"
    m = FileCheckpointManager(d, catalog=catalog_url, run="exp")
    for step in (1, 2, 3, 4):
        save(m, step)
    cat, run, who = m.catalog, m.run, ("h", 1)
    # an interrupted deletion: claimed, files still there
    cat.mark_deleting(cat.live(run.id, 1).id, "manual", who, preserve_model=False)  # type: ignore[union-attr]
    # a dead writer's pending checkpoint and its temporary directory
    w = WriterInfo(
        platform.node(), dead_pid(), None, "t", "t", "t", boot_id=_proc.boot_id(), pid_ns=_proc.pid_namespace()
    )
    dead = cat.begin(run.id, 7, "dead0000beef0001", "step_7", w, hash_algorithm="xxh3_128", overwrite=False)
    (d / layout.tmp_dir_name(7, dead.token)).mkdir()
    # a live writer (this process) mid-save
    m.begin_checkpoint(8)
    m.save_state(make_state(8))
    live_tmp = next(d.glob("step_8.tmp-*"))
    # a committed checkpoint whose files vanished, and a directory nobody knows
    (d / "step_3" / "rank_0.pt").unlink()
    (d / "step_99").mkdir()

    assert main(["gc", "--url", catalog_url, "--dry-run", "--json"]) == 1
    r = json.loads(capsys.readouterr().out)["runs"]["exp"]
    assert r["deletions_finished"] == [1] and r["rolled_back"] == [7] and r["marked_missing"] == [3]
    assert r["foreign"] == ["step_99"] and r["live_writers"] == [8]
    assert (d / "step_1").exists() and (d / layout.tmp_dir_name(7, dead.token)).exists()
    assert state_of(catalog_url, 1) == "deleting" and state_of(catalog_url, 3) == "committed"

    assert main(["gc", "--url", catalog_url, "exp"]) == 1  # found vanished files: exit 1
    out = capsys.readouterr().out
    assert "marked missing: 3" in out and "step_99" in out
    assert not (d / "step_1").exists() and state_of(catalog_url, 1) == "deleted"
    assert not (d / layout.tmp_dir_name(7, dead.token)).exists() and state_of(catalog_url, 7) == "aborted"
    assert state_of(catalog_url, 3) == "missing"
    assert (d / "step_99").exists() and live_tmp.exists() and state_of(catalog_url, 8) == "pending"

    rep = gc(cat, ["exp"], remove_unknown=True)
    assert rep.runs["exp"].removed == ["step_99"] and not (d / "step_99").exists()
    m.commit_checkpoint()  # the live writer was never disturbed
    assert m.get_step_numbers() == [2, 4, 8]
    assert os.listdir(d / "step_8")

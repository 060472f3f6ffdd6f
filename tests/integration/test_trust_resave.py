"""Saving a damaged step again (issue 10, item 13), on a real catalog and real files.

After ``load_last_checkpoint`` falls back past a corrupt or missing newest checkpoint, the trainer
redoes the steps and saves the damaged step again: that needs no ``overwrite=True``, the new commit
supersedes the damaged row (kept in the history, with an event), and the damaged files stay on
disk until the new copy is committed.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from ckptdb import FileCheckpointManager
from ckptdb.errors import CheckpointCorruptError, CheckpointExistsError
from ckptdb.storage import layout
from tests.helpers import assert_state_equal, make_state, run_until_killme, save


def flip_byte(path: Path, offset: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _rows(m: FileCheckpointManager, step: int) -> list[tuple[str, str | None]]:
    return [(c.state, c.delete_reason) for c in m.catalog.checkpoints(m.run.id, with_scores=False) if c.step_nr == step]


@pytest.mark.parametrize("damage", ["corrupt", "missing"])
def test_resave_after_fallback_past_a_damaged_newest_checkpoint(tmp_path: Path, catalog_url: str, damage: str) -> None:
    d = tmp_path / "c"
    m = FileCheckpointManager(d, catalog=catalog_url, run="exp")
    for step in (1, 2, 3):
        save(m, step)
    if damage == "corrupt":
        flip_byte(d / "step_3" / "rank_0.pt")
    else:
        shutil.rmtree(d / "step_3")
    damaged_bytes = (d / "step_3" / "rank_0.pt").read_bytes() if damage == "corrupt" else None

    # the trainer resumes: falls back to step 2 (step 3 recorded as damaged), redoes step 3
    m = FileCheckpointManager(d, catalog=catalog_url, run="exp")
    step, state = m.load_last_checkpoint()
    assert step == 2
    assert_state_equal(state, make_state(2))
    assert _rows(m, 3) == [(damage, None)]
    old = m.catalog.live(m.run.id, 3)
    assert old is not None

    m.begin_checkpoint(3)  # no overwrite=True needed
    m.save_state(make_state(3))
    if damaged_bytes is not None:  # the damaged copy is untouched until the new one commits
        assert (d / "step_3" / "rank_0.pt").read_bytes() == damaged_bytes
    m.commit_checkpoint()

    assert m.get_step_numbers() == [1, 2, 3]
    step, state = m.load_last_checkpoint()
    assert step == 3
    assert_state_equal(state, make_state(3))
    assert not list(d.glob("step_3.*"))  # no debris left
    # history kept: the damaged row is superseded, says why, and has its event
    rows = sorted(m.catalog.checkpoints(m.run.id, step_nr=3, with_scores=False), key=lambda c: c.id)
    assert [c.state for c in rows] == ["superseded", "committed"]
    assert rows[0].id == old.id
    why = rows[0].delete_reason or ""
    assert why.startswith(f"replaced by a new save after damage ({damage})") and f"#{rows[1].id}" in why
    events = m.catalog.events(old.id)
    assert (events[-1]["from_state"], events[-1]["to_state"]) == (damage, "superseded")
    assert events[-1]["reason"] == why


def test_aborted_resave_leaves_the_damaged_copy_alone(tmp_path: Path, catalog_url: str) -> None:
    d = tmp_path / "c"
    m = FileCheckpointManager(d, catalog=catalog_url, run="exp")
    save(m, 1)
    flip_byte(d / "step_1" / "rank_0.pt")
    damaged = (d / "step_1" / "rank_0.pt").read_bytes()
    with pytest.raises(CheckpointCorruptError, match="step 1"):
        m.load_checkpoint(1)
    m.begin_checkpoint(1)
    m.save_state(make_state(10))
    m.abort_checkpoint()
    assert _rows(m, 1)[0][0] == "corrupt"
    assert (d / "step_1" / "rank_0.pt").read_bytes() == damaged
    # a reopened manager (recovery) keeps it too
    m = FileCheckpointManager(d, catalog=catalog_url, run="exp")
    assert (d / "step_1" / "rank_0.pt").read_bytes() == damaged


def test_committed_step_still_needs_overwrite(tmp_path: Path, catalog_url: str) -> None:
    m = FileCheckpointManager(tmp_path / "c", catalog=catalog_url, run="exp")
    save(m, 1)
    with pytest.raises(CheckpointExistsError, match="overwrite=True"):
        m.begin_checkpoint(1)


def test_missing_step_with_a_foreign_directory_in_its_place_is_not_replaced(tmp_path: Path, catalog_url: str) -> None:
    d = tmp_path / "c"
    m = FileCheckpointManager(d, catalog=catalog_url, run="exp")
    save(m, 1)
    save(m, 2)  # the directory still holds a committed step: step 1's absence is damage, not an unmount
    shutil.rmtree(d / "step_1")
    with pytest.raises(CheckpointCorruptError, match="step 1"):
        m.load_checkpoint(1)
    assert _rows(m, 1) == [("missing", None)]
    (d / "step_1").mkdir()  # someone else's directory (no .ckptdb_token) now stands there
    (d / "step_1" / "notes.txt").write_text("not ckptdb's")
    with pytest.raises(CheckpointExistsError, match=r"no \.ckptdb_token"):
        m.begin_checkpoint(1)
    assert (d / "step_1" / "notes.txt").read_text() == "not ckptdb's"
    assert not (d / "step_1" / layout.TOKEN_FILE).exists()


_KILLED_RESAVE = """
import sys, time
sys.path.insert(0, sys.argv[3])  # the repository root
import ckptdb.storage.writer as writer_mod
from ckptdb import FileCheckpointManager
from tests.helpers import make_state

orig = writer_mod.publish

def publish(checkpoint_dir, step_nr, token, *, fsync=True):
    final = checkpoint_dir / f"step_{step_nr}"
    final.rename(checkpoint_dir / f"step_{step_nr}.old-{token}")  # step 5 of the commit protocol
    print("KILLME between_renames", flush=True)
    time.sleep(120)
    raise SystemExit("not killed")

writer_mod.publish = publish
m = FileCheckpointManager(sys.argv[1], catalog=sys.argv[2], run="exp")
m.begin_checkpoint(1)
m.save_state(make_state(10))
m.commit_checkpoint()
"""


def test_resave_killed_between_renames_puts_the_damaged_copy_back(tmp_path: Path, catalog_url: str) -> None:
    d = tmp_path / "c"
    m = FileCheckpointManager(d, catalog=catalog_url, run="exp")
    save(m, 1)
    flip_byte(d / "step_1" / "rank_0.pt")
    damaged = (d / "step_1" / "rank_0.pt").read_bytes()
    with pytest.raises(CheckpointCorruptError, match="step 1"):
        m.load_checkpoint(1)
    root = str(Path(__file__).resolve().parents[2])
    lines = run_until_killme([sys.executable, "-c", _KILLED_RESAVE, str(d), catalog_url, root])
    assert lines[-1] == "KILLME between_renames"
    assert not (d / "step_1").exists()  # the damaged copy was set aside when the writer died
    m = FileCheckpointManager(d, catalog=catalog_url, run="exp")
    assert m.last_recovery is not None and m.last_recovery.rolled_back == [1] and m.last_recovery.restored == [1]
    assert _rows(m, 1)[0] == ("corrupt", None) and len(_rows(m, 1)) == 2  # + the aborted attempt
    assert (d / "step_1" / "rank_0.pt").read_bytes() == damaged
    assert sorted(p.name for p in d.iterdir() if p.is_dir()) == ["step_1"]

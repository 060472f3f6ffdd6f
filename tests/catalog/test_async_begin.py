"""Asynchronous saves defer the begin: ``begin_checkpoint`` checks what the row's insert would refuse
and makes nothing; the background commit makes the pending row and the directory before its first
write. Refusals still come from ``begin_checkpoint``; a writer that took the step in between makes
the background commit fail with nothing left behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from ckptdb import FileCheckpointManager, SaveOptions
from ckptdb.asyncsave import BackgroundCommitError
from ckptdb.errors import CheckpointExistsError, InvalidOperationError
from tests.helpers import assert_state_equal, make_state, work_dirs

ASYNC = SaveOptions(blocking=False)


def test_nothing_exists_until_the_commit(tmp_path: Path, catalog_url: str) -> None:
    d = tmp_path / "c"
    m = FileCheckpointManager(d, catalog=catalog_url, save_options=ASYNC)
    m.begin_checkpoint(1)
    m.save_state(make_state(1, size=64))
    m.save_score(0.5)
    assert m.get_checkpoints() == []  # no pending row yet
    assert [p.name for p in d.iterdir() if p.name.startswith("step_")] == []  # no directory either
    m.commit_checkpoint()
    m.wait()
    (info,) = m.get_checkpoints()
    assert (info.step_nr, info.state, info.scores["score"]) == (1, "committed", 0.5)
    assert_state_equal(m.load_checkpoint(1, verify="digest"), make_state(1, size=64))
    assert work_dirs(d) == []


def test_refusals_still_come_from_begin_checkpoint(tmp_path: Path, catalog_url: str) -> None:
    d = tmp_path / "c"
    m = FileCheckpointManager(d, catalog=catalog_url, save_options=ASYNC)
    m.begin_checkpoint(1)
    m.save_state(make_state(1, size=64))
    m.commit_checkpoint()
    with pytest.raises(CheckpointExistsError, match="step 1 already has a committed checkpoint"):
        m.begin_checkpoint(1)
    (d / "step_7").mkdir()  # a directory the catalog cannot account for
    with pytest.raises(CheckpointExistsError, match="step_7"):
        m.begin_checkpoint(7)
    # the same manager goes on; overwrite=True replaces step 1
    m.begin_checkpoint(1, overwrite=True)
    m.save_state(make_state(11, size=64))
    m.commit_checkpoint()
    m.wait()
    assert_state_equal(m.load_checkpoint(1, verify="digest"), make_state(11, size=64))
    assert [c.state for c in m.get_checkpoints()] == ["superseded", "committed"]


def test_a_writer_that_took_the_step_in_between_wins(tmp_path: Path, catalog_url: str) -> None:
    d = tmp_path / "c"
    slow = FileCheckpointManager(d, catalog=catalog_url, save_options=ASYNC)
    slow.begin_checkpoint(3)
    slow.save_state(make_state(1, size=64))
    other = FileCheckpointManager(d, catalog=catalog_url)  # same run, same catalog, blocking
    other.begin_checkpoint(3)
    other.save_state(make_state(2, size=64))
    other.commit_checkpoint()
    slow.commit_checkpoint()  # returns; the background begin finds step 3 committed
    with pytest.raises(BackgroundCommitError, match="step 3 already has a committed checkpoint"):
        slow.wait()
    assert [(c.step_nr, c.state) for c in slow.get_checkpoints()] == [(3, "committed")]  # no row of the loser
    assert_state_equal(slow.load_checkpoint(3, verify="digest"), make_state(2, size=64))
    assert work_dirs(d) == []
    slow.begin_checkpoint(4)  # the error was raised once; the manager goes on
    slow.save_state(make_state(4, size=64))
    slow.commit_checkpoint()
    assert slow.get_step_numbers() == [3, 4]


def test_a_pending_writer_is_refused_at_begin(tmp_path: Path, catalog_url: str) -> None:
    d = tmp_path / "c"
    other = FileCheckpointManager(d, catalog=catalog_url)
    other.begin_checkpoint(5)  # pending, not committed
    m = FileCheckpointManager(d, catalog=catalog_url, save_options=ASYNC)
    with pytest.raises(InvalidOperationError, match="step 5 is already being written"):
        m.begin_checkpoint(5)
    other.abort_checkpoint()


def test_abort_after_a_deferred_begin_leaves_nothing(tmp_path: Path, catalog_url: str) -> None:
    d = tmp_path / "c"
    m = FileCheckpointManager(d, catalog=catalog_url, save_options=ASYNC)
    m.begin_checkpoint(2)
    m.save_state(make_state(2, size=64))
    m.abort_checkpoint()
    assert m.get_checkpoints() == []
    assert work_dirs(d) == []
    m.begin_checkpoint(2)
    m.save_state(make_state(2, size=64))
    m.commit_checkpoint()
    assert m.get_step_numbers() == [2]


def test_metadata_makes_the_row_first(tmp_path: Path, catalog_url: str) -> None:
    d = tmp_path / "c"
    m = FileCheckpointManager(d, catalog=catalog_url, save_options=ASYNC)
    m.begin_checkpoint(6)
    m.save_metadata({"lr": 0.1})  # written now, so the row and the directory are made now
    assert [(c.step_nr, c.state) for c in m.get_checkpoints()] == [(6, "pending")]
    m.save_state(make_state(6, size=64))
    m.commit_checkpoint()
    m.wait()
    (info,) = m.get_checkpoints()
    assert info.state == "committed" and info.user_metadata == {"lr": 0.1}
    assert work_dirs(d) == []


def test_close_with_a_deferred_begin_leaves_nothing(tmp_path: Path, catalog_url: str) -> None:
    d = tmp_path / "c"
    m = FileCheckpointManager(d, catalog=catalog_url, save_options=ASYNC)
    m.begin_checkpoint(8)
    m.save_state(make_state(8, size=64))
    m.close()
    m2 = FileCheckpointManager(d, catalog=catalog_url)
    assert m2.get_checkpoints() == [] and m2.last_recovery is not None and m2.last_recovery.rolled_back == []
    assert work_dirs(d) == []

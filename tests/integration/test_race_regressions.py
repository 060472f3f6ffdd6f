"""Regression tests for what the race checker and the multi-host rehearsal found
(docs/reliability.md)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ckptdb import FileCheckpointManager
from ckptdb.errors import CheckpointError
from tests.helpers import make_state


def test_writer_rolled_back_while_away_says_so(tmp_path: Path, catalog_url: str) -> None:
    """A writer frozen past the heartbeat timeout, whose pending checkpoint another host's recovery
    rolled back (row aborted, temporary directory removed), raises saying it was rolled back by
    another process, not only the ENOENT its commit then met; and nothing is committed."""
    m = FileCheckpointManager(tmp_path / "ck", catalog=catalog_url)
    m.begin_checkpoint(7)
    m.save_state(make_state(7))
    assert m._open is not None and m._open.info is not None
    # what the other host's recovery does, under its run lock
    m.catalog.abort(m._open.info.id, "writer hostA:1 died before commit", ("hostB", 1))
    shutil.rmtree(m._open.writer.tmp_dir)
    with pytest.raises(CheckpointError, match="rolled back by another process"):
        m.commit_checkpoint()
    assert m.get_step_numbers() == []
    assert not list((tmp_path / "ck").glob("step_7*"))
    m.begin_checkpoint(7)  # the process goes on
    m.save_state(make_state(7))
    m.commit_checkpoint()
    assert m.get_step_numbers() == [7]
    m.close()

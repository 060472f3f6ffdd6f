"""SIGKILL a process while its background commit is writing: reopen rolls the pending checkpoint
back, the previous step loads, no debris is left."""

from __future__ import annotations

import sys
from pathlib import Path

from ckptdb import FileCheckpointManager
from tests.helpers import assert_state_equal, make_state, run_until_killme, work_dirs

CHILD = Path(__file__).with_name("child_async.py")


def test_sigkill_during_background_write(tmp_path: Path, catalog_url: str) -> None:
    directory = tmp_path / "ckpt"
    lines = run_until_killme([sys.executable, str(CHILD), str(directory), catalog_url])
    assert "committed 1" in lines and "KILLME background-write" in lines
    assert any(p.name.startswith("step_2.tmp-") for p in directory.iterdir())  # killed mid-write

    m = FileCheckpointManager(directory, catalog=catalog_url)
    assert m.last_recovery is not None and m.last_recovery.rolled_back == [2]
    assert m.get_step_numbers() == [1]
    assert [c.state for c in m.get_checkpoints()] == ["committed", "aborted"]
    assert work_dirs(directory) == []
    step, state = m.load_last_checkpoint()
    assert step == 1
    assert_state_equal(state, make_state(1, size=64))

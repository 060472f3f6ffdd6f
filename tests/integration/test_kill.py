"""SIGKILL a real writer process at each point of the save, commit, overwrite and delete protocols;
reopen; only committed steps are visible, every one of them intact, and no debris is left."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from ckptdb import FileCheckpointManager
from tests.helpers import assert_state_equal, make_state, run_until_killme, work_dirs

CHILD = Path(__file__).with_name("child_writer.py")

# point -> (steps committed after recovery, expected content of step 1 as make_state seed)
CASES = {
    "save_state": ([1, 2], 1),
    "commit_before_rename": ([1, 2], 1),
    "commit_after_rename": ([1, 2], 1),
    "overwrite_between_renames": ([1, 2], 1),
    "overwrite_after_commit": ([1, 2], 103),
    "delete_after_mark": ([1, 3], 1),
    "delete_after_files": ([1, 3], 1),
}


def run_and_kill(directory: Path, url: str, point: str, n: int) -> list[str]:
    return run_until_killme([sys.executable, str(CHILD), str(directory), url, point, str(n)])


@pytest.mark.parametrize("point", sorted(CASES))
def test_sigkill_then_reopen(tmp_path: Path, catalog_url: str, point: str) -> None:
    directory = tmp_path / "ckpt"
    n = 3
    lines = run_and_kill(directory, catalog_url, point, n)
    assert lines[-1] == f"KILLME {point}" or lines[-1] == "KILLME end"

    m = FileCheckpointManager(directory, catalog=catalog_url)
    steps, step1_seed = CASES[point]
    assert m.get_step_numbers() == steps
    assert work_dirs(directory) == [], sorted(p.name for p in directory.iterdir())
    # every committed checkpoint has all its files, matching their digests
    for step in steps:
        seed = step1_seed if step == 1 else step
        assert_state_equal(m.load_checkpoint(step, verify="digest"), make_state(seed, size=64))
    last, _ = m.load_last_checkpoint()
    assert last == steps[-1]
    on_disk = sorted(p.name for p in directory.iterdir() if p.name.startswith("step_"))
    assert on_disk == [f"step_{s}" for s in steps]
    # the writer can go on: the killed step saves again
    m.begin_checkpoint(10)
    m.save_state(make_state(10))
    m.commit_checkpoint()
    assert m.get_step_numbers() == [*steps, 10]
    # and a second reopen has nothing left to do
    again = FileCheckpointManager(directory, catalog=catalog_url)
    assert again.last_recovery is not None and not again.last_recovery.changed

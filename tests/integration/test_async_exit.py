"""An asynchronous save still in flight when the program ends is finished, not lost: the worker
thread (kept between saves) is joined at interpreter exit."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from ckptdb import FileCheckpointManager

CHILD = textwrap.dedent(
    """
    import sys, torch
    from ckptdb import FileCheckpointManager, SaveOptions
    mgr = FileCheckpointManager(sys.argv[1], catalog=sys.argv[2], save_options=SaveOptions(blocking=False))
    state = {"model": {f"w{i}": torch.full((1 << 18,), float(i)) for i in range(32)}}  # 32 MiB
    for step in (1, 2):
        mgr.begin_checkpoint(step)  # waits for step 1's commit
        mgr.save_state(state)
        mgr.commit_checkpoint()
    assert mgr._committer.background.in_flight == 2, "the test needs the commit still in flight"
    # the script ends here with step 2 being written in the background
    """
)


def test_a_commit_in_flight_at_exit_finishes(tmp_path: Path, catalog_url: str) -> None:
    d = tmp_path / "ck"
    r = subprocess.run([sys.executable, "-c", CHILD, str(d), catalog_url], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    mgr = FileCheckpointManager(d, catalog=catalog_url)
    assert mgr.get_step_numbers() == [1, 2]
    assert float(mgr.load_checkpoint(2)["model"]["w31"][0]) == 31.0

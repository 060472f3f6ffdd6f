"""A writer for the pid-namespace tests: begins step STEP, saves its state, says READY, then waits.

    python tests/integration/child_ns_writer.py DIR URL STEP MODE

MODE ``commit``: wait for a line on stdin, then commit and print COMMITTED (exit 0; a failed
commit prints FAILED and the error, exit 1). MODE ``die``: exit at once without committing or
aborting (as a SIGKILLed writer would), leaving the pending row and its temporary directory.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ckptdb import FileCheckpointManager
from ckptdb.errors import CheckpointError
from tests.helpers import make_state


def main() -> int:
    d, url, step, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    m = FileCheckpointManager(d, catalog=url, run="exp")
    m.begin_checkpoint(step)
    m.save_state(make_state(step))
    print(f"READY pid={os.getpid()} ", flush=True)
    if mode == "die":
        os._exit(0)  # no abort, no cleanup: the pending row stays behind
    sys.stdin.readline()
    try:
        m.commit_checkpoint()
    except CheckpointError as e:  # the parent reads what went wrong
        print(f"FAILED {type(e).__name__}: {e}", flush=True)
        return 1
    print("COMMITTED", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

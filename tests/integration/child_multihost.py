"""A writer on one "host" of the multi-host rehearsal (tests/integration/test_multihost.py).

    python tests/integration/child_multihost.py MODE DIR URL RUN STEPS [STALE_S]

MODE ``write``: checkpoint every step of STEPS (comma list) into RUN, then print DONE.
MODE ``hold``: begin the first step of STEPS, save its state, print READY, wait until DIR/../go
exists (the test freezes this process meanwhile), then commit: prints COMMITTED, or FAILED and the
error. Every line printed is prefixed with this host's name and pid (as this pid namespace sees it).
"""

from __future__ import annotations

import os
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ckptdb import FileCheckpointManager, RecoveryOptions
from ckptdb.errors import CheckpointError
from tests.helpers import make_state


def say(msg: str) -> None:
    print(f"{socket.gethostname()} pid={os.getpid()} {msg}", flush=True)


def main() -> int:
    mode, d, url, run, steps = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
    stale = timedelta(seconds=float(sys.argv[6])) if len(sys.argv) > 6 else timedelta(hours=2)
    m = FileCheckpointManager(d, catalog=url, run=run, recovery_options=RecoveryOptions(stale_after=stale))
    nrs = [int(s) for s in steps.split(",")]
    if mode == "write":
        for n in nrs:
            m.begin_checkpoint(n)
            m.save_state(make_state(n))
            m.save_score(float(n))
            m.commit_checkpoint()
        say("DONE")
        m.close()
        return 0
    m.begin_checkpoint(nrs[0])
    m.save_state(make_state(nrs[0]))
    say("READY")
    go = Path(d).parent / "go"
    while not go.exists():
        time.sleep(0.05)
    try:
        m.commit_checkpoint()
    except CheckpointError as e:
        say(f"FAILED {type(e).__name__}: {e}")
        return 1
    say("COMMITTED")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Child processes for the protocol tests (tests/integration/test_trust_proto.py).

    python tests/integration/child_proto.py MODE DIR URL SYNC

Pause points print ``AT <name>`` and wait for the parent to create the file ``SYNC/<name>``, so
the parent can interleave two real processes at precise points of the protocol. Each pause wraps
a public seam (``storage.writer.publish``, ``Catalog.in_states`` / ``Catalog.live``, the owner-token
read ``storage.writer.read_token``) the same way on the code before and after the fix.

Modes:
    recover          open a manager (recovery runs); pause after it read the pending rows (R0) and
                     after its first read of a step's live row (R1)
    overwrite        overwrite step 1 with make_state(101); pause between the two renames of
                     the publish (W1) and after them, before the catalog commit (W2)
    overwrite_wait   begin an overwrite of step 1, save make_state(101), pause (W0), commit
    delete           open, then delete step 1; pause after finish_delete read the owner (D1)
    overwrite_once   overwrite step 1 with make_state(101) (no pause; run under strace); on a
                     CheckpointError, load step 1 size-only and by digest in this process and
                     print what was served
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from ckptdb import FileCheckpointManager
from ckptdb.catalog import store
from ckptdb.errors import CheckpointError
from ckptdb.storage import writer
from tests.helpers import make_state

SYNC = Path(".")


def pause(name: str) -> None:
    print(f"AT {name}", flush=True)
    deadline = time.monotonic() + 120
    while not (SYNC / name).exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"no go for {name}")
        time.sleep(0.01)


def once(name: str) -> Any:
    """A flag that is true the first time only."""
    fired: list[bool] = []

    def first() -> bool:
        if fired:
            return False
        fired.append(True)
        return True

    return first


def equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and set(a) == set(b) and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def recover(directory: Path, url: str) -> None:
    orig_in_states = store.Catalog.in_states
    orig_live = store.Catalog.live
    r0, r1 = once("R0"), once("R1")

    def in_states(self: store.Catalog, run_id: int, states: Any) -> Any:
        out = orig_in_states(self, run_id, states)
        if [s.value for s in states] == ["pending"] and r0():
            pause("R0")
        return out

    def live(self: store.Catalog, run_id: int, step_nr: int) -> Any:
        out = orig_live(self, run_id, step_nr)
        if r1():
            pause("R1")
        return out

    store.Catalog.in_states = in_states  # type: ignore[method-assign]
    store.Catalog.live = live  # type: ignore[method-assign]
    m = FileCheckpointManager(directory, catalog=url)
    print(f"recovered {m.last_recovery}", flush=True)


def overwrite(directory: Path, url: str) -> None:
    def publish(checkpoint_dir: Path, step_nr: int, token: str, *, fsync: bool = True) -> bool:
        # the publish as it is on disk: step_N -> .old-<token>, tmp -> step_N, fsync
        final = checkpoint_dir / f"step_{step_nr}"
        final.rename(checkpoint_dir / f"step_{step_nr}.old-{token}")
        pause("W1")
        (checkpoint_dir / f"step_{step_nr}.tmp-{token}").rename(final)
        pause("W2")
        writer.fsync_dir(checkpoint_dir)
        return True

    writer.publish = publish  # type: ignore[assignment]
    m = FileCheckpointManager(directory, catalog=url)
    m.begin_checkpoint(1, overwrite=True)
    m.save_state(make_state(101))
    m.commit_checkpoint()
    print("committed 1", flush=True)


def overwrite_wait(directory: Path, url: str) -> None:
    m = FileCheckpointManager(directory, catalog=url)
    m.begin_checkpoint(1, overwrite=True)
    m.save_state(make_state(101))
    pause("W0")
    m.commit_checkpoint()
    print("committed 1", flush=True)


def delete(directory: Path, url: str) -> None:
    m = FileCheckpointManager(directory, catalog=url)
    orig = writer.read_token
    d1 = once("D1")

    def read_owner(d: Path) -> str | None:
        out = orig(d)
        if d1():
            pause("D1")
        return out

    writer.read_token = read_owner
    m.delete_checkpoint(1)
    print("deleted 1", flush=True)


def overwrite_once(directory: Path, url: str) -> None:
    print(f"PID {os.getpid()}", flush=True)
    m = FileCheckpointManager(directory, catalog=url)
    m.begin_checkpoint(1, overwrite=True)
    m.save_state(make_state(101))
    try:
        m.commit_checkpoint()
    except CheckpointError as e:
        print(f"ERROR {e}".replace("\n", " "), flush=True)
        for verify in ("size", "digest"):
            try:
                got = m.load_checkpoint(1, verify=verify)
            except CheckpointError as e2:
                print(f"LOAD {verify} error {type(e2).__name__}", flush=True)
                continue
            what = "old" if equal(got, make_state(1)) else "new" if equal(got, make_state(101)) else "other"
            print(f"LOAD {verify} {what}", flush=True)
        return
    print("committed 1", flush=True)


def main() -> None:
    global SYNC
    mode, directory, url = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    SYNC = Path(sys.argv[4]) if len(sys.argv) > 4 else Path(".")
    {
        "recover": recover,
        "overwrite": overwrite,
        "overwrite_wait": overwrite_wait,
        "delete": delete,
        "overwrite_once": overwrite_once,
    }[mode](directory, url)


if __name__ == "__main__":
    main()

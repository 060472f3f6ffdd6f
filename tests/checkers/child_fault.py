"""Child processes for tests/checkers/test_faultcheck.py (real processes, real injected faults).

    python tests/checkers/child_fault.py MODE DIR

Modes:
    debris   steps 1, 2 committed, then three dead writers (scripts/faultcheck's setup_debris);
             exits without closing the catalog (its -wal and -shm files stay)
    open     open a manager (recovery runs); print ``OK`` or ``ERR <type>: <message>``
    shm      (LD_PRELOAD=faultshim.so; DIR/ck made by ``debris``) scripts/faultcheck's recovery
             protocol (open a manager) while the first create-open of ``catalog.db-shm`` fails with
             EIO, then, faults off, save step 9 in the same process; print the outcome as JSON
    walsync  (LD_PRELOAD=faultshim.so; DIR/ck made by ``debris``) save step 3 while the catalog
             commit's fdatasync of the WAL fails; die right after (see the function)
    state    print JSON: committed steps, rows left pending/deleting, debris directories
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sqlite3
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts" / "faultcheck"))

import faultcheck  # noqa: E402


def wal_sync_fails_at_commit_then_crash(d: Path) -> None:
    """Save step 3; the catalog commit's fdatasync of ``catalog.db-wal`` fails with EIO; the process
    dies (exit 9) right after, before the manager undoes the publish. The failed transaction's frames
    must not come back as committed when the catalog is next opened."""
    import ckptdb.commit as commit_mod
    from ckptdb.catalog import store

    shim = faultcheck.Shim()
    real_commit = store.Catalog.commit

    def commit(self: Any, *a: Any, **k: Any) -> Any:
        shim.arm("fdatasync", 1, errno.EIO, "catalog.db-wal")  # the COMMIT at the end of the run lock
        shim.start(d)
        return real_commit(self, *a, **k)

    def die(*a: Any, **k: Any) -> None:
        print(f"FIRED {shim.fired()[0]}", flush=True)
        os._exit(9)

    store.Catalog.commit = commit  # type: ignore[method-assign]
    commit_mod.Committer.undo_publish = die  # type: ignore[method-assign,assignment]
    m = faultcheck.manager(d / "ck")
    faultcheck.save(m, 3, 3)
    print("SAVED (the fault did not fail the commit)", flush=True)


def main() -> None:
    logging.disable(logging.CRITICAL)
    mode, d = sys.argv[1], Path(sys.argv[2])
    if mode == "debris":
        faultcheck.setup_debris(d)
        sys.stdout.flush()
        os._exit(0)  # like the dead writers: the catalog's -wal and -shm stay (as while others have it open)
    elif mode == "open":
        try:
            faultcheck.manager(d).close()
            print("OK")
        except Exception as e:  # noqa: BLE001 - what escapes is the point
            print(f"ERR {type(e).__name__}: {e}")
    elif mode == "shm":  # d: the work directory (the checkpoint directory is d/ck)
        res = faultcheck.faulted(faultcheck.ALL["recovery"], d, "openat", 1, errno.EIO, "catalog.db-shm")
        print(json.dumps({k: res.get(k) for k in ("fired", "fired_path", "error", "message", "later")}))
    elif mode == "walsync":  # (LD_PRELOAD=faultshim.so; d/ck made by ``debris``)
        wal_sync_fails_at_commit_then_crash(d)
    elif mode == "state":
        con = sqlite3.connect(d / "catalog.db")
        rows = con.execute("SELECT step_nr, state FROM checkpoints").fetchall()
        con.close()
        print(
            json.dumps(
                {
                    "committed": sorted(s for s, st in rows if st == "committed"),
                    "unfinished": sorted(s for s, st in rows if st in ("pending", "deleting")),
                    "debris": sorted(
                        p.name for p in d.iterdir() if any(t in p.name for t in (".tmp", ".old-", ".trash-"))
                    ),
                }
            )
        )
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()

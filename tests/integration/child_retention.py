"""A trainer for the item-7 kill test: fairseq2's keep_last_n_models pattern, then a
``keep_last_n_checkpoints(2)`` that removes model-only steps; at the chosen point of that removal
it prints KILLME and stalls so the parent can SIGKILL it there.

    python tests/integration/child_retention.py DIR URL POINT

Points: ``after_claim`` (rows 'deleting', files untouched), ``after_rename`` (the model-only
directory renamed to ``step_N.trash-*``, not yet removed), ``before_mark`` (files gone, row still
'deleting').

DIR may be ``s3://bucket/prefix`` (the AWS_* environment names the server). There nothing is renamed:
the row is marked deleted under the lock and the prefix removed after it, so the points are
``after_claim`` (at the no-op set-aside), ``before_mark``, and ``after_rename`` = after the mark, before
the prefix's objects are deleted.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import ckptdb.storage.writer as writer_mod
from ckptdb import FileCheckpointManager
from ckptdb.catalog import store
from tests.helpers import make_state

armed = False


def stall(where: str) -> None:
    print(f"KILLME {where}", flush=True)
    time.sleep(120)
    raise SystemExit("not killed")


def install_s3(point: str) -> None:
    from ckptdb.storage.objectstore import ObjectStore

    if point == "after_claim":
        orig_set_aside = ObjectStore.set_aside

        def set_aside(self: ObjectStore, directory: str, step_nr: int) -> str:
            if armed:
                stall(point)
            return orig_set_aside(self, directory, step_nr)

        ObjectStore.set_aside = set_aside  # type: ignore[method-assign]
    elif point == "after_rename":
        orig_remove = ObjectStore.remove

        def remove(self: ObjectStore, handle: str) -> None:
            if armed:
                stall(point)
            orig_remove(self, handle)

        ObjectStore.remove = remove  # type: ignore[method-assign]
    else:
        install(point)


def install(point: str) -> None:
    if point == "after_claim":
        orig_to_trash = writer_mod.to_trash

        def to_trash(path: Path, step_nr: int, *, fsync: bool = True) -> Path:
            if armed:
                stall(point)
            return orig_to_trash(path, step_nr, fsync=fsync)

        writer_mod.to_trash = to_trash  # type: ignore[assignment]
    elif point == "after_rename":
        orig_rmtree = shutil.rmtree

        def rmtree(path: Any, *a: Any, **kw: Any) -> None:
            if armed and ".trash-" in str(path):
                stall(point)
            orig_rmtree(path, *a, **kw)

        shutil.rmtree = rmtree  # type: ignore[assignment]
    elif point == "before_mark":
        orig_mark = store.Catalog.mark_deleted

        def mark_deleted(self, *a, **kw):  # type: ignore[no-untyped-def]
            if armed:
                stall(point)
            return orig_mark(self, *a, **kw)

        store.Catalog.mark_deleted = mark_deleted  # type: ignore[method-assign]
    else:
        raise SystemExit(f"unknown point {point}")


def main() -> None:
    global armed
    url, point = sys.argv[2], sys.argv[3]
    directory: str | Path = sys.argv[1] if sys.argv[1].startswith("s3://") else Path(sys.argv[1])
    (install_s3 if isinstance(directory, str) else install)(point)
    m = FileCheckpointManager(directory, catalog=url, run="exp")
    for step in (1, 2, 3, 4):
        m.begin_checkpoint(step)
        m.save_state(make_state(step))
        m.save_score(float(step))
        m.commit_checkpoint()
        m.keep_last_n_checkpoints(4)
        m.keep_last_n_checkpoints(1, preserve_model=True)
        print(f"committed {step}", flush=True)
    armed = True  # 1, 2, 3 are model-only: keep_last(2) removes the models of 1 and 2
    m.keep_last_n_checkpoints(2)
    stall("end")


if __name__ == "__main__":
    main()

"""A writer process for kill tests: saves steps 1..N and, at the chosen point of the last save,
prints KILLME and stalls so the parent can SIGKILL it there.

    python tests/integration/child_writer.py DIR URL POINT N
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ckptdb import FileCheckpointManager
from ckptdb.catalog import store
from ckptdb.storage import writer
from tests.helpers import make_state

armed = False


_said = threading.Lock()


def stall(where: str) -> None:
    if _said.acquire(blocking=False):  # files are written in parallel threads: say it once
        print(f"KILLME {where}", flush=True)
    time.sleep(120)
    raise SystemExit("not killed")


def install(point: str) -> None:
    if point == "save_state":
        for cls in (writer._HashingFile, writer._DirectFile):  # buffered and O_DIRECT file objects

            def write(self: Any, data: bytes, orig_write: Any = cls.write) -> int:
                n: int = orig_write(self, data)
                if armed and self.size > 512:
                    stall(point)
                return n

            cls.write = write  # type: ignore[method-assign]
    elif point in ("commit_before_rename", "overwrite_between_renames"):
        orig_publish = writer.publish

        def publish(checkpoint_dir: Path, step_nr: int, token: str, *, fsync: bool = True) -> bool:
            if armed and point == "commit_before_rename":
                stall(point)
            if armed:
                final = checkpoint_dir / f"step_{step_nr}"
                final.rename(checkpoint_dir / f"step_{step_nr}.old-{token}")
                stall(point)
            return orig_publish(checkpoint_dir, step_nr, token, fsync=fsync)

        import ckptdb.storage.writer as writer_mod

        writer_mod.publish = publish  # type: ignore[assignment]
    elif point == "commit_after_rename":
        orig_commit = store.Catalog.commit

        def commit(self, *a, **kw):  # type: ignore[no-untyped-def]
            if armed:
                stall(point)
            return orig_commit(self, *a, **kw)

        store.Catalog.commit = commit  # type: ignore[method-assign]
    elif point == "overwrite_after_commit":
        import ckptdb.storage.writer as writer_mod

        orig_remove = writer_mod.remove_tree

        def remove_tree(path: Path, *, fsync: bool = True) -> None:
            if armed and ".old-" in path.name:
                stall(point)
            orig_remove(path, fsync=fsync)

        writer_mod.remove_tree = remove_tree  # type: ignore[assignment]
    elif point in ("delete_after_mark", "delete_after_files"):
        orig_trash = writer.to_trash
        orig_mark = store.Catalog.mark_deleted

        def to_trash(path: Path, step_nr: int, *, fsync: bool = True) -> Path:
            if armed and point == "delete_after_mark":
                stall(point)
            return orig_trash(path, step_nr, fsync=fsync)

        def mark_deleted(self, *a, **kw):  # type: ignore[no-untyped-def]
            if armed and point == "delete_after_files":
                stall(point)
            return orig_mark(self, *a, **kw)

        writer.to_trash = to_trash  # type: ignore[assignment]
        store.Catalog.mark_deleted = mark_deleted  # type: ignore[method-assign]
    else:
        raise SystemExit(f"unknown point {point}")


def main() -> None:
    global armed
    directory, url, point, n = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
    install(point)
    m = FileCheckpointManager(directory, catalog=url)
    for step in range(1, n + 1):
        last = step == n
        overwrite = point.startswith("overwrite") and last
        armed = last and not point.startswith("delete")
        s = 1 if overwrite else step
        m.begin_checkpoint(s, overwrite=overwrite)
        m.save_state(make_state(100 + step if overwrite else step, size=64))
        m.save_score(float(step))
        m.commit_checkpoint()
        print(f"committed {s}", flush=True)
    if point.startswith("delete"):
        armed = True
        m.delete_checkpoint(2)
    stall("end")


if __name__ == "__main__":
    main()

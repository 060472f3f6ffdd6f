"""Checks of a step's files against their catalog rows: sizes, and digests when asked.

No torch here: ``verify``, ``gc``, ``prune`` and recovery check files without importing it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path

from ckptdb.errors import CheckpointCorruptError
from ckptdb.storage import layout
from ckptdb.storage.hashing import hash_file
from ckptdb.storage.writer import FileRecord


def check_file(step_dir: Path, rec: FileRecord, step_nr: int, *, digest: bool = True) -> None:
    """Raise :class:`CheckpointCorruptError` when the file differs from what the catalog says."""
    path = layout.shard_path(step_dir, rec.path, step_nr)
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        raise CheckpointCorruptError(step_nr, str(path), f"{rec.size_bytes} bytes", "no file", missing=True) from None
    if size != rec.size_bytes:
        raise CheckpointCorruptError(step_nr, str(path), f"{rec.size_bytes} bytes", f"{size} bytes")
    if digest:
        _, actual = hash_file(path, rec.hash_algorithm, readahead=True)
        if actual != rec.digest:
            raise CheckpointCorruptError(
                step_nr, str(path), f"{rec.hash_algorithm}:{rec.digest}", f"{rec.hash_algorithm}:{actual}"
            )


def check_files(step_dir: Path, recs: Sequence[FileRecord], step_nr: int, *, digest: bool = True) -> None:
    """:func:`check_file` for several files; digests are computed in parallel threads (one per file).

    Reading two files at once keeps more I/O in flight than one sequential stream, and the hashes
    release the GIL. Raises the error of the first damaged file in ``recs`` order.
    """
    if not digest or len(recs) < 2:
        for rec in recs:
            check_file(step_dir, rec, step_nr, digest=digest)
        return
    errors: list[BaseException | None] = [None] * len(recs)

    def run(i: int) -> None:
        try:
            check_file(step_dir, recs[i], step_nr, digest=True)
        except BaseException as e:  # noqa: BLE001 - re-raised below, in order
            errors[i] = e

    threads = [threading.Thread(target=run, args=(i,), name=f"ckptdb-verify-{i}") for i in range(len(recs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for e in errors:
        if e is not None:
            raise e


def check_digest(path: Path, rec: FileRecord, step_nr: int, actual: str | None) -> None:
    """Raise :class:`CheckpointCorruptError` unless ``actual`` (hashed here when ``None``) is ``rec``'s digest."""
    if actual is None:
        _, actual = hash_file(path, rec.hash_algorithm, readahead=True)
    if actual != rec.digest:
        raise CheckpointCorruptError(
            step_nr, str(path), f"{rec.hash_algorithm}:{rec.digest}", f"{rec.hash_algorithm}:{actual}"
        )


__all__ = ["check_digest", "check_file", "check_files"]

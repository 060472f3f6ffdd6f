"""Write one checkpoint's files into a temporary step directory, hashing as the bytes go out.

Call order: ``open()`` -> ``write_torch()`` / ``write_bytes()`` * -> ``finalize()`` | ``abort()``,
then :func:`publish` renames the finished directory into place (see docs/architecture.md).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ckptdb.errors import InvalidOperationError
from ckptdb.storage import layout
from ckptdb.storage.hashing import Hasher, new_hasher


@dataclass(frozen=True, slots=True)
class FileRecord:
    """What the catalog records for one written file."""

    path: str  # relative to the step directory, '/'-separated
    size_bytes: int
    hash_algorithm: str
    digest: str
    rank: int = 0
    kind: str = "state"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _HashingFile:
    """A write-only file object that hashes and counts every byte written through it."""

    def __init__(self, f: Any, hasher: Hasher) -> None:
        self._f = f
        self._hasher = hasher
        self.size = 0

    def write(self, data: bytes | memoryview) -> int:
        self._hasher.update(data)
        n = self._f.write(data)
        self.size += len(data)
        return int(n) if n is not None else len(data)

    def flush(self) -> None:
        self._f.flush()


class StepWriter:
    """Writes the files of one checkpoint into ``step_<N>.tmp-<token>/``."""

    def __init__(
        self,
        checkpoint_dir: Path,
        step_nr: int,
        token: str,
        *,
        hash_algorithm: str,
        fsync: bool = True,
    ) -> None:
        self.checkpoint_dir = checkpoint_dir
        self.step_nr = step_nr
        self.token = token
        self.hash_algorithm = hash_algorithm
        self.fsync = fsync
        self.tmp_dir = checkpoint_dir / layout.tmp_dir_name(step_nr, token)
        self.records: dict[str, FileRecord] = {}

    def open(self, *, create: bool = True) -> None:
        """Create the temporary directory (``create=False``: it was made by another rank)."""
        if create:
            self.tmp_dir.mkdir(parents=False, exist_ok=False)
            (self.tmp_dir / layout.TOKEN_FILE).write_text(self.token + "\n")

    def _open_file(self, relpath: str) -> Path:
        if relpath in self.records:
            raise InvalidOperationError(
                f"{relpath} was already written for step {self.step_nr}: pass the whole state to one "
                "save_state() call (a second call would replace the first one's file)"
            )
        path = layout.resolve_inside(self.tmp_dir, relpath)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def _finish(self, f: Any, relpath: str, size: int, hasher: Hasher, rank: int, kind: str) -> FileRecord:
        f.flush()
        if self.fsync:
            os.fsync(f.fileno())
        rec = FileRecord(relpath, size, self.hash_algorithm, hasher.hexdigest(), rank, kind)
        self.records[relpath] = rec
        return rec

    def write_torch(self, relpath: str, obj: Any, *, rank: int = 0, kind: str = "state") -> FileRecord:
        """``torch.save`` ``obj`` to ``relpath``, hashing while writing (no second read pass)."""
        path = self._open_file(relpath)
        hasher = new_hasher(self.hash_algorithm)
        with open(path, "wb", buffering=4 << 20) as f:
            hf = _HashingFile(f, hasher)
            torch.save(obj, hf)  # type: ignore[arg-type]  # any object with write() and flush()
            return self._finish(f, relpath, hf.size, hasher, rank, kind)

    def write_bytes(self, relpath: str, data: bytes, *, rank: int = 0, kind: str = "state") -> FileRecord:
        path = self._open_file(relpath)
        hasher = new_hasher(self.hash_algorithm)
        hasher.update(data)
        with open(path, "wb") as f:
            f.write(data)
            return self._finish(f, relpath, len(data), hasher, rank, kind)

    def finalize(self) -> None:
        """Make the directory entries durable before the rename."""
        if self.fsync:
            for sub in sorted({p.parent for p in self.tmp_dir.rglob("*")} | {self.tmp_dir}):
                fsync_dir(sub)

    def abort(self) -> None:
        shutil.rmtree(self.tmp_dir, ignore_errors=True)


def publish(checkpoint_dir: Path, step_nr: int, token: str, *, fsync: bool = True) -> bool:
    """Rename ``step_<N>.tmp-<token>`` to ``step_<N>``.

    When ``step_<N>`` already exists (an overwrite of a committed step), it is first renamed to
    ``step_<N>.old-<token>``; the caller removes that copy only after the catalog commit.
    Returns True when an old copy was moved aside.
    """
    tmp = checkpoint_dir / layout.tmp_dir_name(step_nr, token)
    final = checkpoint_dir / layout.step_dir_name(step_nr)
    moved_aside = False
    if final.exists():
        final.rename(checkpoint_dir / layout.old_dir_name(step_nr, token))
        moved_aside = True
    tmp.rename(final)
    if fsync:
        fsync_dir(checkpoint_dir)
    return moved_aside


def remove_tree(path: Path, *, fsync: bool = True) -> None:
    """Remove a directory: rename it to a trash name first so a crash leaves recognisable debris."""
    if not path.exists():
        return
    parent = path.parent
    if layout.parse_work_dir(path.name) is None:
        step = layout.parse_step_dir(path.name)
        if step is not None:
            trash = parent / layout.trash_dir_name(step, os.urandom(6).hex())
            path.rename(trash)
            if fsync:
                fsync_dir(parent)
            path = trash
    shutil.rmtree(path, ignore_errors=True)
    if path.exists():  # something refused: surface it
        shutil.rmtree(path)


def write_text_atomic(path: Path, text: str, *, fsync: bool = True) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        if fsync:
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if fsync:
        fsync_dir(path.parent)

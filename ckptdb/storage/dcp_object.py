"""Sharded state through ``torch.distributed.checkpoint`` on an object store (the S3 side of :mod:`.dcp`).

DCP's ``FileSystemWriter`` / ``FileSystemReader`` do the planning and resharding; this module swaps
their file system for one over :class:`~ckptdb.storage.objectstore.ObjectStore`:

* every file DCP creates (``__<rank>_0.distcp``, ``.metadata``) is streamed into a conditional
  multipart upload under the attempt's prefix, hashed on the way (ckptdb's digest + CRC32C);
* DCP writes ``.metadata.tmp`` and renames it: here it is uploaded straight to ``.metadata`` (a
  rename is a copy on S3, and the catalog commit, not the name, makes the checkpoint visible);
* on load each file is fetched once (parallel ranged GETs) and, unless ``verify="none"``, checked
  against the catalog's size and digest in memory before DCP reads from it; ``.metadata`` is
  always checked before it is unpickled.
"""

from __future__ import annotations

import io
import os
import pickle
import threading
import warnings
from collections.abc import Generator, Mapping
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, cast

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystemBase
from torch.distributed.checkpoint.metadata import StorageMeta

from ckptdb.errors import CheckpointCorruptError
from ckptdb.storage.dcp import WeightsOnlyLoadPlanner, _unwrap
from ckptdb.storage.hashing import new_hasher
from ckptdb.storage.sharded import _NO_DIST_WARNING, KIND, METADATA_NAME, SHARDED_DIR
from ckptdb.storage.writer import FileRecord

if TYPE_CHECKING:
    from ckptdb.storage.objectstore import ObjectStore
    from ckptdb.storage.s3client import ObjectWriter

_TMP = ".tmp"


class _Stream(io.RawIOBase):
    """DCP's write stream: an :class:`ObjectWriter` with the ``tell()`` DCP needs for its offsets."""

    def __init__(self, w: ObjectWriter) -> None:
        super().__init__()
        self.w = w

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        return self.w.write(b)

    def tell(self) -> int:
        return self.w.size


class _ObjectFileSystem(FileSystemBase):
    """DCP's file operations on one attempt's ``sharded/`` prefix; paths are ``<directory>/sharded/<name>``."""

    def __init__(
        self,
        store: ObjectStore,
        directory: str,
        *,
        hash_algorithm: str = "",
        rank: int = 0,
        records: Mapping[str, FileRecord] | None = None,
        step_nr: int = 0,
        verify: str = "digest",
    ) -> None:
        self.store = store
        self.directory = directory
        self.hash_algorithm = hash_algorithm
        self.rank = rank
        self.records: dict[str, FileRecord] = {}
        self.expected = dict(records or {})
        self.step_nr = step_nr
        self.verify = verify
        self._lock = threading.Lock()
        self._verified: dict[str, bytearray] = {}

    def _rel(self, path: str | os.PathLike[str]) -> str:
        return PurePosixPath(path).relative_to(self.directory).as_posix()

    @contextmanager
    def create_stream(self, path: str | os.PathLike[str], mode: str) -> Generator[io.IOBase, None, None]:
        rel = self._rel(path)
        if "w" in mode:
            target = rel[: -len(_TMP)] if rel.endswith(METADATA_NAME + _TMP) else rel
            w = self.store.client.open_writer(
                self.store.bucket, self.store.key(self.directory, target), hasher=new_hasher(self.hash_algorithm)
            )
            try:
                yield cast(io.IOBase, _Stream(w))
            except BaseException:
                w.abort()
                raise
            done = w.close()
            rec = FileRecord(rel, done.size, self.hash_algorithm, done.digest, self.rank, KIND, done.checksum)
            with self._lock:
                self.records[rel] = rec
            return
        buf = self.fetch(rel)
        from ckptdb.storage.objectstore import _ViewReader

        yield cast(io.IOBase, io.BufferedReader(_ViewReader(buf)))

    def fetch(self, rel: str) -> bytearray:
        """The whole object, checked against the catalog (size always; digest unless ``verify`` says not)."""
        where = self.store.describe(self.directory, rel)
        rec = self.expected.get(rel)
        if rec is None:
            raise CheckpointCorruptError(self.step_nr, where, "a file recorded in the catalog", "an unrecorded file")
        try:
            buf = self.store.client.read_bytes(self.store.bucket, self.store.key(self.directory, rel))
        except Exception as e:
            if getattr(e, "code", "") == "NoSuchKey":
                raise CheckpointCorruptError(
                    self.step_nr, where, f"{rec.size_bytes} bytes", "no object", missing=True
                ) from None
            raise
        if len(buf) != rec.size_bytes:
            raise CheckpointCorruptError(self.step_nr, where, f"{rec.size_bytes} bytes", f"{len(buf)} bytes")
        if self.verify == "digest" or rel.endswith(METADATA_NAME):
            h = new_hasher(rec.hash_algorithm)
            h.update(memoryview(buf))
            if h.hexdigest() != rec.digest:
                raise CheckpointCorruptError(
                    self.step_nr, where, f"{rec.hash_algorithm}:{rec.digest}", f"{rec.hash_algorithm}:{h.hexdigest()}"
                )
        return buf

    def concat_path(self, path: str | os.PathLike[str], suffix: str) -> str | os.PathLike[str]:
        return PurePosixPath(path) / suffix  # type: ignore[return-value]

    def rename(self, path: str | os.PathLike[str], new_path: str | os.PathLike[str]) -> None:
        """Only ``.metadata.tmp`` -> ``.metadata``, whose bytes were uploaded under the final name."""
        old, new = self._rel(path), self._rel(new_path)
        with self._lock:
            rec = self.records.pop(old)
            self.records[new] = FileRecord(
                new, rec.size_bytes, rec.hash_algorithm, rec.digest, rec.rank, rec.kind, rec.checksum
            )

    def init_path(self, path: str | os.PathLike[str]) -> str | os.PathLike[str]:
        return PurePosixPath(path)  # type: ignore[return-value]

    def mkdir(self, path: str | os.PathLike[str]) -> None:
        return None

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return False

    def exists(self, path: str | os.PathLike[str]) -> bool:
        rel = self._rel(path)
        if rel.endswith(METADATA_NAME):
            return False  # conditional writes refuse an existing one anyway; nothing to delete first
        return self.store.file_size(self.directory, rel) is not None

    def rm_file(self, path: str | os.PathLike[str]) -> None:
        self.store.client.delete_keys(self.store.bucket, [self.store.key(self.directory, self._rel(path))])

    def ls(self, path: str | os.PathLike[str]) -> list[str]:
        return sorted(self.store.list_files(self.directory))


class ObjectStorageWriter(FileSystemWriter):
    """DCP's writer into ``<attempt>/sharded/`` on an object store; :attr:`records` holds this rank's files."""

    def __init__(self, store: ObjectStore, directory: str, *, rank: int, hash_algorithm: str) -> None:
        super().__init__(Path(directory) / SHARDED_DIR, single_file_per_rank=True, sync_files=False, overwrite=False)
        self.fs = _ObjectFileSystem(store, directory, hash_algorithm=hash_algorithm, rank=rank)  # type: ignore[assignment]
        self.path = PurePosixPath(directory) / SHARDED_DIR

    @property
    def records(self) -> dict[str, FileRecord]:
        return cast(_ObjectFileSystem, self.fs).records


class ObjectStorageReader(FileSystemReader):
    """DCP's reader over a committed attempt's ``sharded/`` objects, checking each against the catalog."""

    def __init__(
        self, store: ObjectStore, directory: str, records: Mapping[str, FileRecord], step_nr: int, *, verify: str
    ) -> None:
        super().__init__(Path(directory) / SHARDED_DIR)
        self.fs = _ObjectFileSystem(  # type: ignore[assignment]
            store, directory, records=records, step_nr=step_nr, verify=verify
        )
        self.path = PurePosixPath(directory) / SHARDED_DIR
        self.error: CheckpointCorruptError | None = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("rank") is not None:  # DCP's fallback to per-rank metadata, which ckptdb never writes
            raise FileNotFoundError(f"{SHARDED_DIR}/__{kwargs['rank']}{METADATA_NAME}")
        try:
            data = cast(_ObjectFileSystem, self.fs).fetch(f"{SHARDED_DIR}/{METADATA_NAME}")
        except CheckpointCorruptError as e:
            self.error = e
            raise
        metadata = pickle.loads(data)  # only after its digest matched the catalog's
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan: Any, planner: Any) -> Any:
        try:
            return super().read_data(plan, planner)
        except CheckpointCorruptError as e:
            self.error = e
            raise


def save_sharded(
    store: ObjectStore, directory: str, state: dict[str, Any], *, rank: int, process_group: Any, hash_algorithm: str
) -> dict[str, FileRecord]:
    """``dcp.save`` into ``<directory>/sharded/`` on the object store; returns this rank's records."""
    writer = ObjectStorageWriter(store, directory, rank=rank, hash_algorithm=hash_algorithm)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_NO_DIST_WARNING)
            dcp.save(state, storage_writer=writer, process_group=process_group, no_dist=process_group is None)
    except CheckpointException as e:
        raise _unwrap(e) from None
    return writer.records


def load_sharded(
    store: ObjectStore,
    directory: str,
    state: dict[str, Any],
    records: Mapping[str, FileRecord],
    step_nr: int,
    *,
    process_group: Any,
    verify: str,
) -> None:
    """``dcp.load`` into ``state`` in place from ``<directory>/sharded/``, resharding to its layout."""
    reader = ObjectStorageReader(store, directory, records, step_nr, verify=verify)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_NO_DIST_WARNING)
            dcp.load(
                state,
                storage_reader=reader,
                planner=WeightsOnlyLoadPlanner(),
                process_group=process_group,
                no_dist=process_group is None,
            )
    except CheckpointException as e:
        if reader.error is not None:
            raise reader.error from None
        raise _unwrap(e) from None

"""The :class:`~ckptdb.storage.store.Store` on an S3-compatible object store (docs/object-storage.md).

Layout: a run at ``s3://bucket/prefix`` keeps each save attempt under its own prefix
``prefix/step_<N>.<token>/`` with fairseq2's names inside (``model.pt``, ``rank_<r>.pt``,
``score.txt``, ...). Nothing is ever renamed: the catalog row's flip to ``committed`` is the
commit, and the row's ``directory`` is ``step_<N>.<token>``. Prefixes of two attempts never overlap
(``step_1.<a>/`` is not a prefix of ``step_1.<b>/``), so removing an attempt -- abort its incomplete
multipart uploads, then delete every object under exactly its prefix -- never touches another
attempt, a committed checkpoint or an imported fairseq2 ``step_<N>/``. Which prefix to remove is
always decided by a token the catalog knows (:meth:`ObjectStore.owner` parses it from the name),
never by listing and guessing.

Every object is written conditionally (``If-None-Match: *``): a write never replaces an object,
so two writers that somehow got the same token fail instead of mixing their files. The only
overwritten object is the run's top-level ``model.yaml`` (:meth:`ObjectStore.write_text`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import mmap as _mmap
import os
import re
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from ckptdb.errors import (
    CheckpointCorruptError,
    CheckpointError,
    InvalidOperationError,
    ObjectStoreError,
)
from ckptdb.storage import layout
from ckptdb.storage.hashing import new_hasher
from ckptdb.storage.location import ObjectLocation
from ckptdb.storage.s3client import ObjectMeta, S3Client, config_from
from ckptdb.storage.store import AttemptWriter, ProgressFn, Published, Store
from ckptdb.storage.writer import FileRecord, TorchFile, _no_torch_crc32, _run_threads

log = logging.getLogger("ckptdb")

_ATTEMPT_RE = re.compile(r"^step_(\d+)\.([0-9a-f]{16})$")
_ENTRY_RE = re.compile(r"^step_\d+(\.[0-9A-Za-z_-]+)?$")


def attempt_dir_name(step_nr: int, token: str) -> str:
    return f"step_{step_nr}.{token}"


def parse_attempt_dir(name: str) -> tuple[int, str] | None:
    """``step_<N>.<16 hex>`` -> (N, token); anything else -> None."""
    m = _ATTEMPT_RE.match(name)
    return (int(m.group(1)), m.group(2)) if m else None


class _ViewReader(io.RawIOBase):
    """A read-only, seekable file over a buffer already in memory (no second copy of the whole object)."""

    def __init__(self, buf: bytearray | memoryview) -> None:
        self._view = memoryview(buf)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        out = memoryview(b).cast("B")
        n = max(0, min(len(out), len(self._view) - self._pos))
        out[:n] = self._view[self._pos : self._pos + n]
        self._pos += n
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos


@contextlib.contextmanager
def _fetch(
    client: S3Client, bucket: str, key: str, size: int, *, mmap: bool
) -> Iterator[tuple[memoryview, str | None]]:
    """The object's ``size`` bytes in memory (parallel ranged GETs): (a view of them, a path that names
    them for ``torch.load(mmap=True)`` or None). With ``mmap`` on Linux the bytes live in a memfd
    (``/proc/self/fd/<n>``); a mapping that ``torch.load`` makes keeps its pages after the fd closes."""
    memfd = getattr(os, "memfd_create", None)
    if mmap and memfd is not None and size > 0 and os.path.isdir("/proc/self/fd"):
        fd = memfd("ckptdb-load", getattr(os, "MFD_CLOEXEC", 0))
        try:
            os.ftruncate(fd, size)
            m = _mmap.mmap(fd, size)
            view = memoryview(m)

            def allocate(lo: int, hi: int) -> None:
                # each range's pages in one call, in its own thread: taken one page fault at a time
                # while the GET writes them, they cost ~40 % of the download's time
                try:
                    os.posix_fallocate(fd, lo, hi - lo)
                except OSError:
                    pass  # not supported here: the pages are allocated as the GET writes them

            try:
                client.read_into(bucket, key, view, prepare=allocate)
                yield view, f"/proc/self/fd/{fd}"
            finally:
                try:
                    view.release()
                    m.close()
                except BufferError:  # a slice still held by an error's traceback: unmapped when collected
                    pass
        finally:
            os.close(fd)
        return
    buf = bytearray(size)
    with memoryview(buf) as view:
        client.read_into(bucket, key, view)
        yield view, None


@contextlib.contextmanager
def _torch_load_errors(step_nr: int, where: str) -> Iterator[None]:
    """torch.load's failures as ckptdb's errors (a hostile pickle, an unreadable file)."""
    import pickle

    from ckptdb.errors import UnsafeCheckpointFileError

    try:
        yield
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointFileError(
            f"checkpoint step {step_nr}: refusing to load {where!r}: it holds objects a "
            f"weights-only load does not allow ({str(exc).splitlines()[0]})"
        ) from exc
    except (RuntimeError, EOFError, ValueError) as exc:
        raise CheckpointCorruptError(step_nr, where, "a readable torch file", str(exc).splitlines()[0]) from exc


class ObjectAttemptWriter(AttemptWriter):
    """Writes one attempt's objects under ``<prefix>/step_<N>.<token>/``; every object is a conditional write."""

    def __init__(self, store: ObjectStore, step_nr: int, token: str, *, hash_algorithm: str, parallel: bool) -> None:
        self.store = store
        self.step_nr = step_nr
        self.token = token
        self.hash_algorithm = hash_algorithm
        self.parallel = parallel
        self.records: dict[str, FileRecord] = {}
        self.write_seconds = 0.0
        self.sync_seconds = 0.0
        self._lock = threading.Lock()
        self._claimed: set[str] = set()

    @property
    def directory(self) -> str:
        return attempt_dir_name(self.step_nr, self.token)

    @property
    def where(self) -> str:
        return self.store.describe(self.directory)

    def open(self, *, create: bool = True) -> None:
        """Nothing to create: the prefix's name carries the token."""

    def _claim(self, relpath: str) -> str:
        layout.check_relpath(relpath, self.step_nr)
        with self._lock:
            if relpath in self.records or relpath in self._claimed:
                raise InvalidOperationError(
                    f"{relpath} was already written for step {self.step_nr}: pass the whole state to one "
                    "save_state() call (a second call would replace the first one's file)"
                )
            self._claimed.add(relpath)
        return self.store.key(self.directory, relpath)

    def _record(self, relpath: str, size: int, digest: str, checksum: str, rank: int, kind: str) -> FileRecord:
        rec = FileRecord(relpath, size, self.hash_algorithm, digest, rank, kind, checksum)
        with self._lock:
            self.records[relpath] = rec
        return rec

    def _save_one(self, f: TorchFile) -> FileRecord:
        from ckptdb.storage import fastsave  # torch's file format, less Python per tensor (imports torch)

        key = self._claim(f.relpath)
        w = self.store.client.open_writer(self.store.bucket, key, hasher=new_hasher(self.hash_algorithm))
        try:
            with _no_torch_crc32():
                fastsave.save(f.obj, w)  # type: ignore[arg-type]
        except Exception as e:
            w.abort()
            if w.error is not None and w.error is not e:  # the real cause (S3), not torch's rewording of it
                raise w.error from e
            raise
        done = w.close()
        return self._record(f.relpath, done.size, done.digest, done.checksum, f.rank, f.kind)

    def write_torch_many(self, files: Sequence[TorchFile]) -> list[FileRecord]:
        if not files:
            return []
        start = time.perf_counter()
        if len(files) == 1 or not self.parallel:
            out = [self._save_one(f) for f in files]
        else:
            out = _run_threads([lambda f=f: self._save_one(f) for f in files])  # type: ignore[misc]
        self.write_seconds += time.perf_counter() - start
        return out

    def write_bytes(self, relpath: str, data: bytes, *, rank: int = 0, kind: str = "state") -> FileRecord:
        key = self._claim(relpath)
        done = self.store.client.put_bytes(self.store.bucket, key, data, hasher=new_hasher(self.hash_algorithm))
        return self._record(relpath, done.size, done.digest, done.checksum, rank, kind)

    def write_sharded(self, state: dict[str, Any], *, rank: int, process_group: Any) -> dict[str, FileRecord]:
        from ckptdb.storage import dcp_object

        records = dcp_object.save_sharded(
            self.store,
            self.directory,
            state,
            rank=rank,
            process_group=process_group,
            hash_algorithm=self.hash_algorithm,
        )
        with self._lock:
            self.records.update(records)
        return records

    def finalize(self) -> None:
        """Nothing left: every object's upload completed (conditionally) when its write returned."""

    def abort(self) -> None:
        """Remove the attempt's objects and uploads; when the store cannot be reached, leave them (logged):
        the catalog row says whose they are, and recovery / gc remove them by that token later."""
        try:
            self.store.remove(self.directory)
        except OSError as e:  # ObjectStoreError included
            log.warning("ckptdb: could not remove %s now (%s); recovery removes it later", self.where, e)


class ObjectStore(Store):
    """A run's payload under ``s3://bucket/prefix`` (see the module docstring)."""

    def __init__(
        self,
        location: ObjectLocation,
        *,
        storage_options: Mapping[str, Any] | None = None,
        client: S3Client | None = None,
    ) -> None:
        self.location: ObjectLocation = location
        self.fsync = True  # an object is durable when its PUT / completion returned
        self.client = client if client is not None else S3Client(config_from(storage_options))

    @property
    def bucket(self) -> str:
        return self.location.bucket

    def key(self, directory: str, relpath: str | None = None) -> str:
        if "/" in directory or directory in ("", ".", ".."):
            raise CheckpointError(f"invalid directory name {directory!r} in {self.url}")
        return self.location.key(directory, relpath) if relpath is not None else self.location.key(directory)

    def _prefix(self, directory: str) -> str:
        return self.key(directory) + "/"

    # -- identity -------------------------------------------------------------------------------

    def ensure_root(self) -> None:
        self.client.check_bucket(self.bucket)

    def writable(self) -> bool:
        return True

    def describe(self, directory: str, relpath: str | None = None) -> str:
        return f"s3://{self.bucket}/{self.key(directory, relpath)}"

    # -- naming ---------------------------------------------------------------------------------

    def attempt_dir(self, step_nr: int, token: str) -> str:
        return attempt_dir_name(step_nr, token)

    def committed_dir(self, step_nr: int, token: str) -> str:
        return attempt_dir_name(step_nr, token)

    def check_directory(self, step_nr: int, directory: str) -> str:
        parsed = parse_attempt_dir(directory)
        if directory == layout.step_dir_name(step_nr) or (parsed is not None and parsed[0] == step_nr):
            return directory
        raise CheckpointCorruptError(
            step_nr,
            directory,
            f"'step_{step_nr}' or 'step_{step_nr}.<token>' under {self.url}",
            f"{directory!r} in the catalog row (refused, never followed)",
        )

    # -- writing and publishing -----------------------------------------------------------------

    def open_writer(
        self, step_nr: int, token: str, *, hash_algorithm: str, parallel: bool = True
    ) -> ObjectAttemptWriter:
        return ObjectAttemptWriter(self, step_nr, token, hash_algorithm=hash_algorithm, parallel=parallel)

    def publish(self, step_nr: int, token: str, *, previous: str | None = None) -> Published:
        return Published(False, previous)

    def unpublish(self, step_nr: int, token: str, published: Published) -> None:
        return None

    def whereabouts(self, step_nr: int, token: str, published: Published | None) -> str:
        return "nothing moves on an object store: the checkpoint was not committed and earlier checkpoints are intact"

    # -- removing -------------------------------------------------------------------------------

    def set_aside(self, directory: str, step_nr: int) -> str:
        return directory  # unreachable once the catalog row says so; nothing to move

    def remove(self, handle: str) -> None:
        """Abort the incomplete multipart uploads under ``handle/``, then delete every object under it."""
        prefix = self._prefix(handle)
        self.client.abort_uploads(self.bucket, prefix)
        self.client.delete_prefix(self.bucket, prefix)

    def remove_tree(self, directory: str) -> None:
        self.remove(directory)

    def remove_files(self, directory: str, keep: set[str]) -> None:
        prefix = self._prefix(directory)
        doomed = [k for k, _ in self.client.list_objects(self.bucket, prefix) if k[len(prefix) :] not in keep]
        self.client.delete_keys(self.bucket, doomed)

    def restore(self, directory: str, step_nr: int) -> None:
        raise InvalidOperationError(f"{self.url}: nothing is ever set aside on an object store ({directory!r})")

    # -- reading --------------------------------------------------------------------------------

    def exists(self, directory: str) -> bool:
        return next(iter(self.client.list_objects(self.bucket, self._prefix(directory))), None) is not None

    def isdir(self, directory: str) -> bool:
        return self.exists(directory)

    def stat(self, directory: str, relpath: str) -> ObjectMeta | None:
        """One HEAD: the object's size and the server's full-object checksum; None when there is no object."""
        return self.client.head(self.bucket, self.key(directory, layout.check_relpath(relpath, 0)))

    def checksum(self, directory: str, relpath: str) -> str | None:
        """The server's full-object checksum (``crc32c:<base64>``) from HEAD, without downloading; None when
        the object is missing or the server keeps none (``verify --remote-checksum``)."""
        meta = self.client.head(self.bucket, self.key(directory, layout.check_relpath(relpath, 0)))
        return None if meta is None else meta.checksum

    def owner(self, directory: str) -> str | None:
        parsed = parse_attempt_dir(directory)
        return parsed[1] if parsed else None

    def list_entries(self) -> list[str]:
        """Prefixes holding objects, and prefixes holding only incomplete multipart uploads (a writer that
        died in its first upload leaves no object at all, only an upload)."""
        root = self.location.prefix + "/" if self.location.prefix else ""
        # a flat listing (1000 keys a request), not LIST with a delimiter: some servers (SeaweedFS) keep
        # listing a "directory" whose objects were all deleted
        names = {
            k[len(root) :].split("/", 1)[0]
            for k, _ in self.client.list_objects(self.bucket, root)
            if "/" in k[len(root) :]
        }
        names |= {
            k[len(root) :].split("/", 1)[0]
            for k in self.client.list_uploads(self.bucket, root)
            if "/" in k[len(root) :]
        }
        return sorted(n for n in names if _ENTRY_RE.match(n))

    def list_files(self, directory: str) -> dict[str, int]:
        prefix = self._prefix(directory)
        return {k[len(prefix) :]: size for k, size in self.client.list_objects(self.bucket, prefix)}

    def file_size(self, directory: str, relpath: str) -> int | None:
        meta = self.client.head(self.bucket, self.key(directory, layout.check_relpath(relpath, 0)))
        return None if meta is None else meta.size

    def hash_file(
        self, directory: str, relpath: str, algorithm: str, progress: ProgressFn | None = None
    ) -> tuple[int, str]:
        """Stream the object once (parallel ranged GETs, a window at a time) through the hasher."""
        key = self.key(directory, layout.check_relpath(relpath, 0))
        meta = self.client.head(self.bucket, key)
        if meta is None:
            raise FileNotFoundError(f"no object {self.describe(directory, relpath)}")
        h = new_hasher(algorithm)
        window = self.client.config.part_size * self.client.config.concurrency
        buf = bytearray(min(window, meta.size))
        view = memoryview(buf)
        for off in range(0, meta.size, window):
            n = min(window, meta.size - off)
            self.client.read_into(self.bucket, key, view[:n], offset=off)
            h.update(view[:n])
            if progress is not None:
                progress(n)
        return meta.size, h.hexdigest()

    def check_file(self, directory: str, rec: FileRecord, step_nr: int, *, digest: bool) -> None:
        layout.check_relpath(rec.path, step_nr)
        where = self.describe(directory, rec.path)
        meta = self.client.head(self.bucket, self.key(directory, rec.path))
        if meta is None:
            raise CheckpointCorruptError(step_nr, where, f"{rec.size_bytes} bytes", "no object", missing=True)
        if meta.size != rec.size_bytes:
            raise CheckpointCorruptError(step_nr, where, f"{rec.size_bytes} bytes", f"{meta.size} bytes")
        if rec.checksum and meta.checksum and rec.checksum != meta.checksum:
            raise CheckpointCorruptError(step_nr, where, rec.checksum, f"{meta.checksum} (the server's checksum)")
        if digest:
            _, actual = self.hash_file(directory, rec.path, rec.hash_algorithm)
            if actual != rec.digest:
                raise CheckpointCorruptError(
                    step_nr, where, f"{rec.hash_algorithm}:{rec.digest}", f"{rec.hash_algorithm}:{actual}"
                )

    def check_files(self, directory: str, records: Sequence[FileRecord], step_nr: int, *, digest: bool) -> None:
        errors: list[BaseException | None] = [None] * len(records)

        def run(i: int) -> None:
            try:
                self.check_file(directory, records[i], step_nr, digest=digest)
            except BaseException as e:  # noqa: BLE001 - re-raised below, in order
                errors[i] = e

        if len(records) < 2:
            for i in range(len(records)):
                run(i)
        else:
            _run_threads([lambda i=i: run(i) for i in range(len(records))])  # type: ignore[misc]
        for e in errors:
            if e is not None:
                raise e

    def _read(self, directory: str, relpath: str) -> bytearray:
        key = self.key(directory, layout.check_relpath(relpath, 0))
        try:
            return self.client.read_bytes(self.bucket, key)
        except ObjectStoreError as e:
            if e.code == "NoSuchKey":
                raise FileNotFoundError(f"no object {self.describe(directory, relpath)}") from e
            raise

    def open_read(self, directory: str, relpath: str) -> BinaryIO:
        return io.BufferedReader(_ViewReader(self._read(directory, relpath)))  # type: ignore[return-value]

    def read_bytes(self, directory: str, relpath: str) -> bytes:
        return bytes(self._read(directory, relpath))

    hashes_on_load = True  # a load fetches the whole object anyway: its digest is checked on those bytes

    def load_torch(
        self, directory: str, relpath: str, step_nr: int, *, mmap: bool = True, expect: FileRecord | None = None
    ) -> Any:
        """Parallel ranged GETs of the whole object into memory, then ``torch.load(weights_only=True)``.

        ``mmap=True`` (the default; Linux): the GETs land in an anonymous in-memory file
        (``memfd_create``) and ``torch.load(mmap=True)`` maps it, so the tensors use the downloaded
        pages as they are: no copy after the download. Writing into a loaded tensor copies the pages
        written (copy-on-write), as with a memory-mapped local file. ``mmap=False`` (or no memfd):
        the GETs fill a buffer that ``torch.load`` copies the tensors out of.

        ``expect``: check the object's size and digest against it, on the bytes fetched, before
        loading (one download serves both; CheckpointCorruptError on a mismatch).
        """
        import torch

        from ckptdb.storage import unpickle
        from ckptdb.storage.gcpause import paused_gc

        where = self.describe(directory, relpath)
        key = self.key(directory, layout.check_relpath(relpath, 0))
        size = expect.size_bytes if expect is not None else None
        try:
            if size is None:
                meta = self.client.head(self.bucket, key)
                if meta is None:
                    raise FileNotFoundError(where)
                size = meta.size
            with _fetch(self.client, self.bucket, key, size, mmap=mmap) as (view, path):
                if expect is not None and expect.digest:
                    h = new_hasher(expect.hash_algorithm)
                    h.update(view)
                    actual = h.hexdigest()
                    if actual != expect.digest:
                        raise CheckpointCorruptError(
                            step_nr,
                            where,
                            f"{expect.hash_algorithm}:{expect.digest}",
                            f"{expect.hash_algorithm}:{actual}",
                        )
                # the digest of a file ckptdb wrote matched: unpickle's fast path may take it
                trusted = expect is not None and bool(expect.digest) and expect.trusted
                with _torch_load_errors(step_nr, where):
                    if path is not None and view[:4] == b"PK\x03\x04":  # mmap needs torch's zip format
                        return unpickle.load(Path(path), mmap=True, trusted=trusted)
                    with paused_gc():
                        return torch.load(
                            io.BufferedReader(_ViewReader(view), buffer_size=1 << 20),  # type: ignore[arg-type]
                            map_location="cpu",
                            weights_only=True,
                        )
        except FileNotFoundError:
            raise CheckpointCorruptError(step_nr, where, "an object", "no object", missing=True) from None
        except ObjectStoreError as e:
            if e.code == "NoSuchKey":
                raise CheckpointCorruptError(step_nr, where, "an object", "no object", missing=True) from e
            if e.code == "ShortRead":
                raise CheckpointCorruptError(step_nr, where, f"{size} bytes", "a shorter object") from e
            raise

    def load_sharded(
        self,
        directory: str,
        state: dict[str, Any],
        records: Mapping[str, FileRecord],
        step_nr: int,
        *,
        process_group: Any,
        verify: str,
    ) -> None:
        from ckptdb.storage import dcp_object

        dcp_object.load_sharded(self, directory, state, records, step_nr, process_group=process_group, verify=verify)

    def write_text(self, name: str, text: str) -> None:
        """Replace a small top-level object (``model.yaml``): the one unconditional write."""
        self.client.put_bytes(self.bucket, self.location.key(name), text.encode(), overwrite=True)


__all__ = ["ObjectAttemptWriter", "ObjectStore", "attempt_dir_name", "parse_attempt_dir"]

"""The storage interface: where a run's payload bytes live, behind which every protocol is written once.

The commit, delete, recovery, gc, verify and load protocols (``ckptdb/commit.py``,
``ckptdb/recovery.py``, ...) decide from catalog rows and act on payload only through a
:class:`Store`. Two implementations:

* :class:`LocalStore` — a directory on a filesystem (today's behaviour, docs/architecture.md):
  an attempt is written into ``step_<N>.tmp-<token>/`` (files fsynced, then the directories),
  published by renaming it to ``step_<N>/`` (an overwritten copy is first renamed aside to
  ``step_<N>.old-<token>/``), removed by renaming it to ``step_<N>.trash-<random>/`` under the
  run's lock and deleting that after the lock.
* ``ObjectStore`` (``ckptdb/storage/objectstore.py``, S3 API) — an attempt is written under its own
  prefix ``step_<N>.<token>/`` and stays there: there is no rename, the catalog row's flip to
  ``committed`` IS the commit. Writes are conditional (``If-None-Match: *``), large files are
  multipart uploads streamed from memory. "Set aside" steps are no-ops; removing an attempt
  aborts its incomplete multipart uploads and deletes every object under its prefix.

Vocabulary
----------
directory
    A name relative to the store's root, without a trailing ``/``: ``step_7``, ``step_7.tmp-ab12``,
    ``step_7.ab12`` (never a path with ``..`` or ``/``). ``checkpoints.directory`` in the catalog
    holds :meth:`Store.committed_dir` of the row: ``step_<N>`` on a local store (and for imported
    fairseq2 checkpoints anywhere), ``step_<N>.<token>`` on an object store. Two directories never
    overlap (an object-store prefix is ``<directory>/``): removing one never touches another.
relpath
    A file inside a directory, ``/``-separated (``model.pt``, ``sharded/__0_0.distcp``), validated
    with :func:`ckptdb.storage.layout.check_relpath` before use.
token
    The 16-hex-digit random id of one save attempt, stored in its catalog row. Debris is only
    ever attributed through a token the catalog knows (:meth:`Store.owner`), never guessed.

Who calls what (one attempt, coordinator rank; the other ranks only write)::

    w = store.open_writer(step, token, ...)     # begin: w.open(create=True)  (other ranks: create=False)
    w.write_torch_many(...) / w.write_bytes(...) / w.write_sharded(...)      # save_state / metadata / score
    w.finalize()                                # commit: make the attempt's bytes durable
    with catalog.run_lock(run):
        p = store.publish(step, token, previous=<live row's directory or None>)
        catalog.commit(row, records)            # on failure: store.unpublish(step, token, p)
    if p.superseded: store.remove(store.set_aside(p.superseded, step))
    | w.abort()                                 # rollback: remove the attempt, whatever exists of it

    with catalog.run_lock(run):                 # delete / recovery / gc
        handle = store.set_aside(row.directory, step)   # unreachable (local: rename to trash)
        catalog.mark_deleted(row)
    store.remove(handle)                        # the bytes go, after the lock

Error contract: methods raise ``OSError`` (or :class:`~ckptdb.errors.CheckpointError` subclasses
where the docstring says so) and never swallow a failure of something they were asked to make
durable; the protocol modules turn them into the messages users see. Nothing in this package
imports the catalog.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from ckptdb.errors import CheckpointError, InvalidArgumentError, UnsupportedCheckpointError
from ckptdb.storage import checks, layout
from ckptdb.storage import writer as _writer
from ckptdb.storage.hashing import hash_file as _hash_path
from ckptdb.storage.location import LocalLocation, Location, ObjectLocation, parse_location
from ckptdb.storage.writer import FileRecord, StepWriter, TorchFile

ProgressFn = Callable[[int], None]


@dataclass(frozen=True, slots=True)
class Published:
    """What :meth:`Store.publish` did, handed back to :meth:`Store.unpublish` and the commit's cleanup."""

    moved_aside: bool  # local: the committed copy of the step was renamed to step_<N>.old-<token>
    superseded: str | None  # the directory holding the replaced copy, removed once the catalog commit stands


class AttemptWriter(abc.ABC):
    """Writes the files of one save attempt (one token) and reports a :class:`FileRecord` per file.

    One instance per rank per attempt. Methods may be called from several threads for different
    relpaths; a relpath is written at most once (a second write raises
    :class:`~ckptdb.errors.InvalidOperationError`). Hashing happens while the bytes go out (no second
    read). ``records`` holds every file this instance wrote (plus those merged in by
    :meth:`write_sharded`), keyed by relpath.
    """

    step_nr: int
    token: str
    records: dict[str, FileRecord]
    write_seconds: float  # wall-clock seconds spent serialising and writing
    sync_seconds: float  # ... and making it durable (fsync, upload completion)

    @property
    @abc.abstractmethod
    def directory(self) -> str:
        """The attempt's directory name (:meth:`Store.attempt_dir`)."""

    @property
    @abc.abstractmethod
    def where(self) -> str:
        """The attempt's location for messages (an absolute path, or ``s3://bucket/prefix/dir``)."""

    @abc.abstractmethod
    def open(self, *, create: bool = True) -> None:
        """Start the attempt. ``create=True`` (the coordinator, once): make the directory and record the
        owner token durably in it (local: ``.ckptdb_token``; object store: the prefix itself names the
        token, nothing is written). ``create=False``: another rank created it. Raises OSError."""

    @abc.abstractmethod
    def write_torch_many(self, files: Sequence[TorchFile]) -> list[FileRecord]:
        """``torch.save`` each file (concurrently), hashing every byte; durable when this returns
        (local: fsynced; object store: the upload completed, conditionally)."""

    def write_torch(self, relpath: str, obj: Any, *, rank: int = 0, kind: str = "state") -> FileRecord:
        """One :meth:`write_torch_many` file."""
        return self.write_torch_many([TorchFile(relpath, obj, rank, kind)])[0]

    @abc.abstractmethod
    def write_bytes(self, relpath: str, data: bytes, *, rank: int = 0, kind: str = "state") -> FileRecord:
        """Write a small file (``score.txt``) durably."""

    @abc.abstractmethod
    def write_sharded(self, state: dict[str, Any], *, rank: int, process_group: Any) -> dict[str, FileRecord]:
        """``torch.distributed.checkpoint`` save of ``state`` into ``sharded/`` (collective); merges and
        returns this rank's records."""

    @abc.abstractmethod
    def finalize(self) -> None:
        """Make everything written durable before the publish (local: fsync every directory)."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Remove whatever exists of the attempt (idempotent, never raises for a missing attempt).
        Object store: abort its incomplete multipart uploads and delete every object under its prefix."""


class Store(abc.ABC):
    """One run's payload storage (see the module docstring for the protocol and vocabulary)."""

    location: Location
    fsync: bool

    # -- identity -------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The run's identity in the catalog (``runs.checkpoint_dir``): absolute path or ``s3://...``."""
        return self.location.url

    @property
    def is_local(self) -> bool:
        return self.location.is_local

    @property
    def local_root(self) -> Path | None:
        """The checkpoint directory on a local store, else None (for what only exists locally:
        ``catalog.db``, read-only checks)."""
        return self.location.path if isinstance(self.location, LocalLocation) else None

    def __str__(self) -> str:
        return self.url

    @abc.abstractmethod
    def ensure_root(self) -> None:
        """Create the root when missing (local: ``mkdir -p``). Raises CheckpointError naming it when it
        cannot be created or is not a directory (object store: the bucket is missing or refuses us)."""

    @abc.abstractmethod
    def writable(self) -> bool:
        """Whether this process may change the store (local: ``os.access(W_OK)``)."""

    @abc.abstractmethod
    def describe(self, directory: str, relpath: str | None = None) -> str:
        """A directory or file, written for messages (an absolute path, or an ``s3://`` URL)."""

    # -- naming ---------------------------------------------------------------------------------

    @abc.abstractmethod
    def attempt_dir(self, step_nr: int, token: str) -> str:
        """Where attempt ``token`` writes: local ``step_<N>.tmp-<token>``, object ``step_<N>.<token>``."""

    @abc.abstractmethod
    def committed_dir(self, step_nr: int, token: str) -> str:
        """What the catalog records for the attempt once committed: local ``step_<N>``, object
        ``step_<N>.<token>`` (the same as :meth:`attempt_dir`: nothing moves)."""

    @abc.abstractmethod
    def check_directory(self, step_nr: int, directory: str) -> str:
        """Validate a catalog row's ``directory`` for ``step_nr`` before anything follows it.

        Returns it unchanged. Raises :class:`~ckptdb.errors.CheckpointCorruptError` (nothing touched)
        when it names another step, escapes the root, or (local) is a symbolic link.
        """

    # -- writing and publishing (commit protocol) -----------------------------------------------

    @abc.abstractmethod
    def open_writer(self, step_nr: int, token: str, *, hash_algorithm: str, parallel: bool = True) -> AttemptWriter:
        """A writer for attempt ``token`` of ``step_nr`` (nothing happens until :meth:`AttemptWriter.open`)."""

    @abc.abstractmethod
    def publish(self, step_nr: int, token: str, *, previous: str | None = None) -> Published:
        """Put the finished attempt where :meth:`committed_dir` says, called under the run's lock just
        before the catalog commit. ``previous``: the directory of the row this commit replaces, if any.

        Local: rename ``step_<N>`` aside to ``step_<N>.old-<token>`` when it exists, then the attempt to
        ``step_<N>``; fsync. On failure everything moved is put back and CheckpointError says where the
        committed copy is. Object store: nothing to do (``superseded=previous``).
        """

    @abc.abstractmethod
    def unpublish(self, step_nr: int, token: str, published: Published) -> None:
        """Undo :meth:`publish` after a failed catalog commit (only directories carrying ``token`` move);
        raises OSError when a move fails. Object store: no-op."""

    @abc.abstractmethod
    def whereabouts(self, step_nr: int, token: str, published: Published | None) -> str:
        """A sentence saying where the committed copy of the step is after a publish went wrong."""

    # -- removing (abort, delete, recovery, gc, superseded copies) ------------------------------

    @abc.abstractmethod
    def set_aside(self, directory: str, step_nr: int) -> str:
        """Make ``directory`` unreachable as a checkpoint, quickly and atomically (called under the run's
        lock); returns the handle :meth:`remove` takes. Local: rename to ``step_<N>.trash-<random>``
        (fsynced). Object store: no-op, returns ``directory``. Raises OSError."""

    @abc.abstractmethod
    def remove(self, handle: str) -> None:
        """Delete what :meth:`set_aside` returned (called after the lock); idempotent; raises OSError when
        something refuses. Object store: abort incomplete multipart uploads, delete every object."""

    @abc.abstractmethod
    def remove_tree(self, directory: str) -> None:
        """:meth:`set_aside` then :meth:`remove` (debris and superseded copies); a missing one is fine."""

    @abc.abstractmethod
    def remove_files(self, directory: str, keep: set[str]) -> None:
        """Delete every file of ``directory`` except the relpaths in ``keep`` (and the owner token):
        ``delete_checkpoint(preserve_model=True)``."""

    @abc.abstractmethod
    def restore(self, directory: str, step_nr: int) -> None:
        """Move a copy set aside by an unfinished overwrite (``step_<N>.old-<T>``) back to ``step_<N>``
        (recovery). Object store: never called (nothing is set aside)."""

    # -- reading and inspecting -----------------------------------------------------------------

    @abc.abstractmethod
    def exists(self, directory: str) -> bool:
        """Whether ``directory`` exists (local: any entry of that name; object store: an object under it)."""

    @abc.abstractmethod
    def isdir(self, directory: str) -> bool:
        """Whether ``directory`` is a directory (local: ``Path.is_dir``, following a symbolic link;
        object store: as :meth:`exists`)."""

    def checksum(self, directory: str, relpath: str) -> str | None:
        """The store's own full-object checksum of a file (``crc32c:<base64>``), without reading it; None
        where the store keeps none (a local filesystem) or the file is missing."""
        return None

    @abc.abstractmethod
    def owner(self, directory: str) -> str | None:
        """The token of the attempt that made ``directory``, or None (an imported or foreign one).
        Local: its ``.ckptdb_token`` file; object store: the token in the name ``step_<N>.<token>``."""

    @abc.abstractmethod
    def list_entries(self) -> list[str]:
        """The top-level step directories and debris (``step_<N>``, ``step_<N>.<kind>-<token>``,
        ``step_<N>.<token>``), unsorted. What they are is decided by the catalog via :meth:`owner`."""

    @abc.abstractmethod
    def list_files(self, directory: str) -> dict[str, int]:
        """Every file under ``directory`` (relpath -> size), the owner token file excluded; symbolic
        links are reported with size -1 and never followed."""

    @abc.abstractmethod
    def file_size(self, directory: str, relpath: str) -> int | None:
        """The size of one file, None when it does not exist. Raises CheckpointCorruptError when
        ``relpath`` leads outside ``directory``."""

    @abc.abstractmethod
    def hash_file(
        self, directory: str, relpath: str, algorithm: str, progress: ProgressFn | None = None
    ) -> tuple[int, str]:
        """Read one file once: (size, hex digest), reporting bytes read to ``progress``."""

    @abc.abstractmethod
    def check_files(self, directory: str, records: Sequence[FileRecord], step_nr: int, *, digest: bool) -> None:
        """Raise CheckpointCorruptError (``missing=True`` for an absent file) for the first record whose
        file differs in size (or, with ``digest``, digest); hashing runs in parallel."""

    @abc.abstractmethod
    def open_read(self, directory: str, relpath: str) -> BinaryIO:
        """A binary, seekable reader of one file (object store: whole-object or ranged GETs)."""

    def read_bytes(self, directory: str, relpath: str) -> bytes:
        """The whole file."""
        with self.open_read(directory, relpath) as f:
            return f.read()

    #: True when :meth:`load_torch` fetches the whole file into memory anyway (an object store): the
    #: loader then has it check the digest of the bytes it fetched (``expect=``) instead of reading
    #: each file twice (once to hash it, once to load it).
    hashes_on_load: bool = False

    @abc.abstractmethod
    def load_torch(
        self, directory: str, relpath: str, step_nr: int, *, mmap: bool = True, expect: FileRecord | None = None
    ) -> Any:
        """``torch.load(weights_only=True)`` of one file. Raises UnsafeCheckpointFileError /
        CheckpointCorruptError as :func:`ckptdb.storage.reader.load_torch` does. With ``expect``, the
        file's size and digest are checked against it first (CheckpointCorruptError)."""

    def load_torch_many(
        self,
        directory: str,
        items: Sequence[tuple[str, FileRecord | None]],
        step_nr: int,
        *,
        mmap: bool = True,
        into: Any = None,
    ) -> list[Any]:
        """:meth:`load_torch` of several ``(relpath, expect)`` files. Returns, per item in order, the
        loaded object or the exception its load raised; the list ends at the first failure.
        (A store may overlap the files' reads: :class:`LocalStore` does.) With ``into``, each loaded
        object's tensors are copied into ``into``'s at the same key paths once every file loaded
        (:mod:`ckptdb.storage.into`; a local store reads large files straight into them)."""
        from ckptdb.storage import into as into_mod

        out: list[Any] = []
        for relpath, expect in items:
            try:
                out.append(self.load_torch(directory, relpath, step_nr, mmap=mmap, expect=expect))
            except Exception as e:  # noqa: BLE001 - returned in its place, the caller raises it
                out.append(e)
                break
        if into is not None and not any(isinstance(r, BaseException) for r in out):
            try:
                return into_mod.copy_all_into(out, into)
            except Exception as e:  # noqa: BLE001 - returned in its place, the caller raises it
                return [e]
        return out

    @abc.abstractmethod
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
        """``torch.distributed.checkpoint`` load of the ``sharded/`` files into ``state`` (collective),
        checking each file read against ``records``."""

    @abc.abstractmethod
    def write_text(self, name: str, text: str) -> None:
        """Replace a small top-level file atomically (``model.yaml``)."""


# -- local filesystem ---------------------------------------------------------------------------


class LocalAttemptWriter(AttemptWriter):
    """:class:`~ckptdb.storage.writer.StepWriter`, behind the :class:`AttemptWriter` interface."""

    def __init__(self, inner: StepWriter) -> None:
        self.inner = inner
        self.step_nr = inner.step_nr
        self.token = inner.token

    @property
    def records(self) -> dict[str, FileRecord]:  # type: ignore[override]
        return self.inner.records

    @property
    def write_seconds(self) -> float:  # type: ignore[override]
        return self.inner.write_seconds

    @property
    def sync_seconds(self) -> float:  # type: ignore[override]
        return self.inner.sync_seconds

    @property
    def directory(self) -> str:
        return self.inner.tmp_dir.name

    @property
    def where(self) -> str:
        return str(self.inner.tmp_dir)

    @property
    def tmp_dir(self) -> Path:
        return self.inner.tmp_dir

    def open(self, *, create: bool = True) -> None:
        self.inner.open(create=create)

    def write_torch_many(self, files: Sequence[TorchFile]) -> list[FileRecord]:
        return self.inner.write_torch_many(files)

    def write_torch(self, relpath: str, obj: Any, *, rank: int = 0, kind: str = "state") -> FileRecord:
        return self.inner.write_torch(relpath, obj, rank=rank, kind=kind)

    def write_bytes(self, relpath: str, data: bytes, *, rank: int = 0, kind: str = "state") -> FileRecord:
        return self.inner.write_bytes(relpath, data, rank=rank, kind=kind)

    def write_sharded(self, state: dict[str, Any], *, rank: int, process_group: Any) -> dict[str, FileRecord]:
        from ckptdb.storage import dcp

        records = dcp.save_sharded(
            state,
            self.inner.tmp_dir,
            rank=rank,
            process_group=process_group,
            hash_algorithm=self.inner.hash_algorithm,
            fsync=self.inner.fsync,
        )
        self.inner.records.update(records)
        return records

    def finalize(self) -> None:
        self.inner.finalize()

    def abort(self) -> None:
        self.inner.abort()


class LocalStore(Store):
    """A checkpoint directory on a filesystem: the rename-based protocol of docs/architecture.md.

    Every method is a thin wrapper over :mod:`ckptdb.storage.writer` / :mod:`~ckptdb.storage.reader`
    / :mod:`~ckptdb.storage.layout`, whose functions keep the protocol's hooks and messages.
    """

    # a load maps the file and takes the digest from the mapped pages as it reads them in (one pass;
    # reader.load_torch_checked), instead of hashing the file first and mapping it after
    hashes_on_load = True

    def __init__(self, location: LocalLocation | Path | str, *, fsync: bool = True) -> None:
        if isinstance(location, Path) and location.is_absolute():
            loc: Location = LocalLocation(location)  # a path ckptdb resolved already: taken as it is
        else:
            loc = parse_location(location)
        if not isinstance(loc, LocalLocation):
            raise CheckpointError(f"LocalStore needs a local directory, not {loc.url!r}")
        self.location: LocalLocation = loc
        self.fsync = fsync

    @property
    def root(self) -> Path:
        return self.location.path

    def path(self, directory: str) -> Path:
        """The absolute path of ``directory`` (a single, validated name)."""
        return layout.resolve_inside(self.root, directory)

    def ensure_root(self) -> None:
        if not self.root.exists():
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise CheckpointError(f"cannot create checkpoint_dir {str(self.root)!r}: {e}") from e
        if not self.root.is_dir():
            raise InvalidArgumentError(f"checkpoint_dir {str(self.root)!r} is not a directory")

    def writable(self) -> bool:
        return os.access(self.root, os.W_OK)

    def describe(self, directory: str, relpath: str | None = None) -> str:
        p = self.root / directory
        return str(p if relpath is None else p / relpath)

    def attempt_dir(self, step_nr: int, token: str) -> str:
        return layout.tmp_dir_name(step_nr, token)

    def committed_dir(self, step_nr: int, token: str) -> str:
        return layout.step_dir_name(step_nr)

    def check_directory(self, step_nr: int, directory: str) -> str:
        layout.step_path(self.root, step_nr, directory)
        return directory

    def open_writer(
        self, step_nr: int, token: str, *, hash_algorithm: str, parallel: bool = True
    ) -> LocalAttemptWriter:
        return LocalAttemptWriter(
            StepWriter(self.root, step_nr, token, hash_algorithm=hash_algorithm, fsync=self.fsync, parallel=parallel)
        )

    def publish(self, step_nr: int, token: str, *, previous: str | None = None) -> Published:
        moved = _writer.publish(self.root, step_nr, token, fsync=self.fsync)
        return Published(moved, layout.old_dir_name(step_nr, token) if moved else None)

    def unpublish(self, step_nr: int, token: str, published: Published) -> None:
        _writer.unpublish(self.root, step_nr, token, moved_aside=published.moved_aside, fsync=self.fsync)

    def whereabouts(self, step_nr: int, token: str, published: Published | None) -> str:
        moved = published is not None and published.moved_aside
        return _writer.committed_copy_whereabouts(self.root, step_nr, token, moved)

    def set_aside(self, directory: str, step_nr: int) -> str:
        return _writer.to_trash(self.path(directory), step_nr, fsync=self.fsync).name

    def remove(self, handle: str) -> None:
        _writer.remove_trash(self.path(handle))

    def remove_tree(self, directory: str) -> None:
        _writer.remove_tree(self.path(directory), fsync=self.fsync)

    def remove_files(self, directory: str, keep: set[str]) -> None:
        step_dir = self.path(directory)
        if not step_dir.exists():
            return
        for entry in sorted(step_dir.rglob("*"), reverse=True):
            rel = entry.relative_to(step_dir).as_posix()
            if rel in keep or rel == layout.TOKEN_FILE:
                continue
            if entry.is_dir():
                try:
                    entry.rmdir()
                except OSError:
                    pass
            else:
                entry.unlink(missing_ok=True)
        if self.fsync:
            _writer.fsync_dir(step_dir)

    def restore(self, directory: str, step_nr: int) -> None:
        self.path(directory).rename(self.root / layout.step_dir_name(step_nr))
        if self.fsync:
            _writer.fsync_dir(self.root)

    def exists(self, directory: str) -> bool:
        return self.path(directory).exists()

    def isdir(self, directory: str) -> bool:
        return self.path(directory).is_dir()

    def owner(self, directory: str) -> str | None:
        return _writer.read_token(self.path(directory))

    def list_entries(self) -> list[str]:
        try:
            with os.scandir(self.root) as it:
                return [
                    e.name
                    for e in it
                    if e.is_dir(follow_symlinks=False)
                    and (layout.parse_step_dir(e.name) is not None or layout.parse_work_dir(e.name) is not None)
                ]
        except FileNotFoundError:
            return []

    def list_files(self, directory: str) -> dict[str, int]:
        base = self.path(directory)
        out: dict[str, int] = {}
        if not base.is_dir():
            return out
        for p in sorted(base.rglob("*")):
            rel = p.relative_to(base).as_posix()
            if rel == layout.TOKEN_FILE:
                continue
            if p.is_symlink():
                out[rel] = -1
            elif p.is_file():
                out[rel] = p.stat().st_size
        return out

    def file_size(self, directory: str, relpath: str) -> int | None:
        path = layout.shard_path(self.path(directory), relpath, 0)
        try:
            return os.stat(path).st_size
        except FileNotFoundError:
            return None

    def hash_file(
        self, directory: str, relpath: str, algorithm: str, progress: ProgressFn | None = None
    ) -> tuple[int, str]:
        return _hash_path(layout.shard_path(self.path(directory), relpath, 0), algorithm, progress)

    def check_files(self, directory: str, records: Sequence[FileRecord], step_nr: int, *, digest: bool) -> None:
        checks.check_files(self.path(directory), records, step_nr, digest=digest)

    def open_read(self, directory: str, relpath: str) -> BinaryIO:
        return open(layout.shard_path(self.path(directory), relpath, 0), "rb")

    def load_torch(
        self, directory: str, relpath: str, step_nr: int, *, mmap: bool = True, expect: FileRecord | None = None
    ) -> Any:
        from ckptdb.storage.reader import load_torch, load_torch_checked

        if expect is not None and mmap:
            return load_torch_checked(self.path(directory), expect, step_nr)  # one read: load, then hash the pages
        if expect is not None:
            self.check_files(directory, [expect], step_nr, digest=True)
        return load_torch(layout.shard_path(self.path(directory), relpath, step_nr), step_nr, mmap=mmap)

    def load_torch_many(
        self,
        directory: str,
        items: Sequence[tuple[str, FileRecord | None]],
        step_nr: int,
        *,
        mmap: bool = True,
        into: Any = None,
    ) -> list[Any]:
        """Each file loaded in turn (mapped), then all of them read in and hashed at once (with
        ``into``: large files read straight into its tensors, see :mod:`ckptdb.storage.into`)."""
        from ckptdb.storage.reader import load_torch_checked_many

        recs = [e for _, e in items if e is not None]
        if not mmap or len(recs) != len(items) or any(r.path != p for (p, _), r in zip(items, recs, strict=True)):
            return super().load_torch_many(directory, items, step_nr, mmap=mmap, into=into)
        return load_torch_checked_many(self.path(directory), recs, step_nr, into=into)

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
        from ckptdb.storage import dcp

        dcp.load_sharded(state, self.path(directory), records, step_nr, process_group=process_group, verify=verify)

    def write_text(self, name: str, text: str) -> None:
        _writer.write_text_atomic(self.path(name), text, fsync=self.fsync)


def open_store(
    location: Location | str | os.PathLike[str],
    *,
    fsync: bool = True,
    storage_options: Mapping[str, Any] | None = None,
    object_store: bool = False,
) -> Store:
    """The :class:`Store` for a parsed (or parseable) location: the one place object storage is wired in.

    Raises:
        InvalidArgumentError: an unparseable or unsupported location (see :func:`parse_location`).
        UnsupportedCheckpointError: an ``s3://`` location from a caller that does not pass
            ``object_store=True`` (one whose protocol is not yet routed through the Store interface).
    """
    loc = parse_location(location)
    if isinstance(loc, LocalLocation):
        return LocalStore(loc, fsync=fsync)
    assert isinstance(loc, ObjectLocation)
    if not object_store:
        raise UnsupportedCheckpointError(
            f"checkpoint_dir {loc.url!r}: object storage (s3://) is not available in this version of ckptdb yet; "
            "use a local or network-mounted directory"
        )
    try:
        from ckptdb.storage.objectstore import ObjectStore
    except ImportError as exc:
        raise UnsupportedCheckpointError(
            f"checkpoint_dir {loc.url!r}: object storage needs the s3 extra (pip install 'ckptdb[s3]'): {exc}"
        ) from exc

    return ObjectStore(loc, storage_options=storage_options)


__all__ = [
    "AttemptWriter",
    "LocalAttemptWriter",
    "LocalStore",
    "Published",
    "Store",
    "open_store",
]

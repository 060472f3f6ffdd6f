"""Write one checkpoint's files into a temporary step directory, hashing as the bytes go out.

Call order: ``open()`` -> ``write_torch()`` / ``write_bytes()`` * -> ``finalize()`` | ``abort()``,
then :func:`publish` renames the finished directory into place (see docs/architecture.md).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import queue
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ckptdb import _hooks
from ckptdb.errors import CheckpointError, InvalidOperationError
from ckptdb.storage import layout
from ckptdb.storage.gcpause import paused_gc
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
    # the object store's own checksum of the file ("crc32c:<base64>", full-object), None on a filesystem
    checksum: str | None = None
    # set by a reader, not stored: the row was written by ckptdb's save (``CheckpointInfo.saved_by_ckptdb``),
    # so bytes matching ``digest`` are what its writer wrote (``unpickle.load``'s fast path may take them)
    trusted: bool = False


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


T = TypeVar("T")
_CHUNK = 16 << 20  # hash + write granularity (a large storage arrives in one write() call)
_WINDOW = 32 << 20  # start the writeback of every 32 MiB as soon as it is written
_SFR_WAIT_BEFORE, _SFR_WRITE, _SFR_WAIT_AFTER = 1, 2, 4  # <linux/fs.h>


def _load_sync_file_range() -> Callable[[int, int, int, int], None] | None:
    """libc's ``sync_file_range(2)`` (Python's os module lacks it); None where it is missing."""
    if not sys.platform.startswith("linux") or os.environ.get("CKPTDB_NO_STREAMING") == "1":
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int

    def sync_file_range(fd: int, offset: int, nbytes: int, flags: int) -> None:
        if fn(fd, offset, nbytes, flags) != 0:  # ctypes releases the GIL during the call
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    return sync_file_range


_sync_file_range = _load_sync_file_range()

# O_DIRECT: the serialiser copies into page-aligned buffers reused from save to save, and writer
# threads pwrite them at their offsets, several in flight per file (docs/architecture.md, "Writing").
_ALIGN = 4096  # offsets and lengths of O_DIRECT writes (the last block is padded, then truncated)
_DBUF = 8 << 20  # one direct buffer
_DEPTH = 4  # buffers per file: one filling, up to three being written
_WRITERS = 3  # writer threads per file
_O_DIRECT = getattr(os, "O_DIRECT", 0)


def direct_enabled() -> bool:
    """O_DIRECT writes are used (Linux; ``CKPTDB_NO_DIRECT=1`` switches them off)."""
    return _O_DIRECT != 0 and os.environ.get("CKPTDB_NO_DIRECT") != "1"


_BIG = 1 << 20  # writes from this size on are copied with ctypes.memmove (GIL released)


def _address(view: memoryview) -> int:
    """The address of a contiguous byte buffer (read-only ones too)."""
    import numpy as np

    return int(np.frombuffer(view, dtype=np.uint8).ctypes.data)


class _BufferPool:
    """Page-aligned anonymous buffers, kept between saves (no page faults on the next save)."""

    def __init__(self, keep: int) -> None:
        self._idle: list[mmap.mmap] = []
        self._keep = keep
        self._lock = threading.Lock()

    def get(self) -> mmap.mmap:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return mmap.mmap(-1, _DBUF)

    def put(self, buf: mmap.mmap) -> None:
        with self._lock:
            if len(self._idle) < self._keep:
                self._idle.append(buf)
                return
        buf.close()


_pool = _BufferPool(keep=2 * _DEPTH)  # two files written at once reuse theirs
_crc_lock = threading.Lock()
_serialising = threading.Lock()  # the turn to run torch.save's Python (see StepWriter._save_one)


@contextmanager
def _let_go(lock: threading.Lock) -> Iterator[None]:
    """Release ``lock`` (held by this thread) for the block, then take it back."""
    lock.release()
    try:
        yield
    finally:
        lock.acquire()


_crc_users = 0
_crc_saved = True
_crc_per_thread: bool | None = None  # torch's CRC32 switch is per thread (probed once, see below)


def _torch() -> Any:
    import torch  # imported on the first save: verify, gc and prune use this module without torch

    return torch


def _fastsave() -> Any:
    """``storage.fastsave`` (torch's file format, less Python per tensor); imports torch."""
    from ckptdb.storage import fastsave

    return fastsave


def _crc_switch_is_per_thread(torch: Any) -> bool:
    """Whether torch's CRC32 switch is per thread, probed once (called with ``_crc_lock`` held).

    In recent torch the switch is a config option whose user setting is thread-local (torch 2.13's
    ``torch.utils._config_module``: "User overrides are thread-local"); in older ones it is process
    wide. The probe sets this thread's switch to True, then False, and asks another thread each time;
    an answer that did not follow means per thread. This thread's value is restored.
    """
    global _crc_per_thread
    if _crc_per_thread is None:
        get, put = torch.serialization.get_crc32_options, torch.serialization.set_crc32_options
        mine = get()
        seen: list[bool] = []
        try:
            for value in (True, False):
                put(value)
                probe = threading.Thread(target=lambda: seen.append(get()), name="ckptdb-crc-probe")
                probe.start()
                probe.join()
        finally:
            put(mine)
        _crc_per_thread = seen[0] == seen[1]
    return _crc_per_thread


@contextmanager
def _no_torch_crc32() -> Iterator[None]:
    """Switch off torch's per-record CRC32 while ckptdb serialises (our digest covers every byte).

    torch reads its switch when a writer is created. Where the switch is per thread (recent torch),
    this thread's is turned off and given back its value at the end: the files written at once are
    written by one thread each, and each one turns off its own (before 2026-12-04 only the first
    did, so every other file of a save paid the CRC32: ~1.5 GB/s, on the save's critical path).
    Where it is process-wide, it is held off while any ckptdb save runs and restored when the last
    one finishes; a user's own ``torch.save`` in another thread meanwhile writes a file without
    CRC32s, which ``torch.load`` reads normally.
    """
    global _crc_users, _crc_saved
    torch = _torch()
    get, put = torch.serialization.get_crc32_options, torch.serialization.set_crc32_options
    with _crc_lock:
        per_thread = _crc_switch_is_per_thread(torch)
        if per_thread:
            mine = get()
            put(False)
        else:
            if _crc_users == 0:
                _crc_saved = get()
                put(False)
            _crc_users += 1
    try:
        yield
    finally:
        if per_thread:
            put(mine)
        else:
            with _crc_lock:
                _crc_users -= 1
                if _crc_users == 0:
                    put(_crc_saved)


def _run_threads(fns: Sequence[Callable[[], T]]) -> list[T]:
    """Run each function in its own thread; return their results in order or raise the first error.

    Plain threads, not an executor: a background commit may still be writing while the interpreter
    shuts down, when executors refuse new work.
    """
    results: list[Any] = [None] * len(fns)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = fns[i]()
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,), name=f"ckptdb-write-{i}") for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        n = os.write(fd, view)
        view = view[n:]


class _HashingFile:
    """The write-only file object ``torch.save`` writes through: straight to an fd, hashing every byte.

    With ``stream=True`` the written bytes are handed to the kernel's writeback window by window
    (``sync_file_range``), waiting for the window before the last, so the device writes while torch
    serialises, dirty memory stays bounded and the final ``fsync`` has little left to do.
    """

    def __init__(self, fd: int, hasher: Hasher, *, stream: bool) -> None:
        self._fd = fd
        self._hasher = hasher
        self._stream = stream and _sync_file_range is not None
        self._kicked = 0  # bytes handed to writeback
        self._waited = 0  # bytes known to be on the device
        self.size = 0
        self.error: OSError | None = None  # torch's C++ writer may replace it with its own message
        self.turns: threading.Lock | None = None  # held while serialising; let go during large writes

    def write(self, data: bytes | memoryview) -> int:
        try:
            if self.turns is not None and len(data) >= _BIG:
                with _let_go(self.turns):
                    return self._write(data)
            return self._write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def _write(self, data: bytes | memoryview) -> int:
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        n = len(view)
        for off in range(0, n, _CHUNK):
            chunk = view[off : off + _CHUNK]
            self._hasher.update(chunk)
            _write_all(self._fd, chunk)
            self.size += len(chunk)
            if self._stream and self.size - self._kicked >= _WINDOW:
                self._writeback()
        return n

    def _writeback(self) -> None:
        assert _sync_file_range is not None
        try:
            _sync_file_range(self._fd, self._kicked, self.size - self._kicked, _SFR_WRITE)
            if self._kicked > self._waited:
                flags = _SFR_WAIT_BEFORE | _SFR_WRITE | _SFR_WAIT_AFTER
                _sync_file_range(self._fd, self._waited, self._kicked - self._waited, flags)
                self._waited = self._kicked
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ESPIPE):
                raise  # EIO and friends: the write failed
            self._stream = False  # a filesystem without it: the final fsync writes everything
        self._kicked = self.size

    def flush(self) -> None:
        return None


class _DirectFile:
    """The write-only file object for an ``O_DIRECT`` fd: hashing in order, writing in parallel.

    ``write`` hashes the bytes and copies them into the current aligned buffer; a full buffer goes to
    the writer threads, which ``pwrite`` it at its offset (up to ``_DEPTH - 1`` in flight) while the
    serialiser fills the next. :meth:`close` writes the padded last block, waits for every write and
    truncates the file to its size; the caller then fsyncs (the device cache and the metadata).
    A filesystem that refuses an O_DIRECT write (EINVAL) gets the fd switched to buffered I/O and
    the write retried. A failed write is raised by the next ``write`` or by ``close``.
    """

    def __init__(self, fd: int, hasher: Hasher) -> None:
        self._fd = fd
        self._hasher = hasher
        self._free: queue.SimpleQueue[mmap.mmap] = queue.SimpleQueue()
        self._todo: queue.SimpleQueue[tuple[mmap.mmap, int, int] | None] = queue.SimpleQueue()
        self._bufs = [_pool.get() for _ in range(_DEPTH)]
        for b in self._bufs[1:]:
            self._free.put(b)
        self._buf = self._bufs[0]
        self._view = memoryview(self._buf)
        self._fill = 0
        self._base = 0  # file offset of the current buffer
        self._failed: OSError | None = None
        self._direct = True
        self._mode_lock = threading.Lock()
        self.error: OSError | None = None
        self.turns: threading.Lock | None = None  # held while serialising; let go during large writes
        self._threads = [
            threading.Thread(target=self._run, name=f"ckptdb-pwrite-{i}", daemon=True) for i in range(_WRITERS)
        ]
        for t in self._threads:
            t.start()

    def write(self, data: bytes | memoryview) -> int:
        fill = self._fill
        if type(data) is memoryview and data.format == "B" and data.ndim == 1:
            n = len(data)
            if n < _DBUF - fill:
                # the common small write (zip headers, names, small tensors): one slice copy; the
                # bytes are hashed with the whole buffer when it is submitted (same order, one call)
                self._view[fill : fill + n] = data
                self._fill = fill + n
                return n
        try:
            if self.turns is not None and len(data) >= _BIG:
                with _let_go(self.turns):
                    return self._write(data)
            return self._write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    @property
    def size(self) -> int:
        """Bytes written so far."""
        return self._base + self._fill

    def _write(self, data: bytes | memoryview) -> int:
        if self._failed is not None:
            raise self._failed
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        n = len(view)
        src = _address(view) if n >= _BIG else None
        done = 0
        while done < n:
            k = min(n - done, _DBUF - self._fill)
            if src is not None:  # a memcpy that releases the GIL: the other file's thread runs meanwhile
                with memoryview(self._buf) as dst:
                    ctypes.memmove(_address(dst) + self._fill, src + done, k)
            else:
                self._view[self._fill : self._fill + k] = view[done : done + k]
            self._fill += k
            done += k
            if self._fill == _DBUF:
                self._submit(_DBUF)
                self._next_buffer()
        return n

    def _submit(self, nbytes: int) -> None:
        """Hash the buffer's ``_fill`` bytes (buffers are filled and hashed in file order) and queue it."""
        for off in range(0, self._fill, _CHUNK):
            self._hasher.update(self._view[off : min(off + _CHUNK, self._fill)])
        self._todo.put((self._buf, self._base, nbytes))
        self._base += self._fill
        self._fill = 0

    def _next_buffer(self) -> None:
        self._view.release()
        self._buf = self._free.get()  # waits for a writer to finish one
        self._view = memoryview(self._buf)
        if self._failed is not None:
            raise self._failed

    def _pwrite(self, view: memoryview, offset: int) -> None:
        while view:
            try:
                k = os.pwrite(self._fd, view, offset)
            except OSError as e:
                if e.errno != errno.EINVAL or not self._direct:
                    raise
                with self._mode_lock:  # the filesystem takes no O_DIRECT: go through the page cache
                    if self._direct:
                        fl = fcntl.fcntl(self._fd, fcntl.F_GETFL)
                        fcntl.fcntl(self._fd, fcntl.F_SETFL, fl & ~_O_DIRECT)
                        self._direct = False
                continue
            if k == 0:
                raise OSError(errno.EIO, f"pwrite wrote nothing at offset {offset}")
            view = view[k:]
            offset += k

    def _run(self) -> None:
        while True:
            item = self._todo.get()
            if item is None:
                return
            buf, offset, nbytes = item
            try:
                if self._failed is None:
                    with memoryview(buf) as v:
                        self._pwrite(v[:nbytes], offset)
            except OSError as e:
                self._failed = self._failed or e
            except BaseException as e:  # noqa: BLE001 - surfaced by write()/close()
                self._failed = self._failed or OSError(errno.EIO, f"writer thread failed: {e!r}")
            finally:
                self._free.put(buf)

    def close(self) -> None:
        """Write what is left (padded), wait for every write, truncate to the size; raise a failure."""
        try:
            tail = self._fill
            if tail:
                padded = -(-tail // _ALIGN) * _ALIGN
                self._view[tail:padded] = bytes(padded - tail)
                self._submit(padded)  # hashes the tail's bytes only (not the padding)
            else:
                self._free.put(self._buf)
        finally:
            self._view.release()
            for _ in self._threads:
                self._todo.put(None)
            for t in self._threads:
                t.join()
            for b in self._bufs:
                _pool.put(b)
            self._bufs = []
        if self._failed is not None:
            self.error = self.error or self._failed
            raise self._failed
        if tail:
            os.ftruncate(self._fd, self.size)

    def flush(self) -> None:
        return None


@dataclass(frozen=True, slots=True)
class TorchFile:
    """One file of a checkpoint to ``torch.save`` (see :meth:`StepWriter.write_torch_many`)."""

    relpath: str
    obj: Any
    rank: int = 0
    kind: str = "state"


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
        parallel: bool = True,
        direct: bool | None = None,
    ) -> None:
        self.checkpoint_dir = checkpoint_dir
        self.step_nr = step_nr
        self.token = token
        self.hash_algorithm = hash_algorithm
        self.fsync = fsync
        self.parallel = parallel  # write_torch_many: one thread per file
        self.direct = direct_enabled() if direct is None else direct and _O_DIRECT != 0  # torch files: O_DIRECT
        self.tmp_dir = checkpoint_dir / layout.tmp_dir_name(step_nr, token)
        self.records: dict[str, FileRecord] = {}
        self._lock = threading.Lock()
        # wall-clock seconds spent writing (serialising + page cache + streamed writeback) and syncing
        self.write_seconds = 0.0
        self.sync_seconds = 0.0

    def open(self, *, create: bool = True) -> None:
        """Create the temporary directory (``create=False``: it was made by another rank)."""
        if create:
            self.tmp_dir.mkdir(parents=False, exist_ok=False)
            # recovery decides whose copy a directory is by this file: it must survive a power loss
            # as surely as the payload (its directory entry is made durable by finalize())
            fd = os.open(
                self.tmp_dir / layout.TOKEN_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
            )
            try:
                _write_all(fd, memoryview((self.token + "\n").encode()))
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)

    def _open_file(self, relpath: str) -> Path:
        if relpath in self.records:
            raise InvalidOperationError(
                f"{relpath} was already written for step {self.step_nr}: pass the whole state to one "
                "save_state() call (a second call would replace the first one's file)"
            )
        path = layout.resolve_inside(self.tmp_dir, relpath)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def _record(self, relpath: str, size: int, hasher: Hasher, rank: int, kind: str) -> FileRecord:
        rec = FileRecord(relpath, size, self.hash_algorithm, hasher.hexdigest(), rank, kind)
        with self._lock:
            self.records[relpath] = rec
        return rec

    def _save_one(self, f: TorchFile) -> tuple[FileRecord, float, float]:
        """torch.save one file; returns its record and the perf_counter times its data was written / synced."""
        path = self._open_file(f.relpath)
        hasher = new_hasher(self.hash_algorithm)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
        fd = -1
        if self.direct:
            try:
                fd = os.open(path, flags | _O_DIRECT, 0o644)
            except OSError as e:
                if e.errno != errno.EINVAL:  # EINVAL: this filesystem has no O_DIRECT
                    raise
        direct = fd != -1
        if not direct:
            fd = os.open(path, flags, 0o644)
        try:
            hf: _HashingFile | _DirectFile = (
                _DirectFile(fd, hasher) if direct else _HashingFile(fd, hasher, stream=self.fsync)
            )
            try:
                try:
                    # serialising is Python under the GIL (the pickler, one write() per record): files
                    # written at once take turns at it, and overlap only their large writes (copies
                    # and I/O without the GIL), which let go of the turn; the pickler's memo and
                    # per-tensor tuples would otherwise set off the cyclic collector (gcpause)
                    with _serialising, paused_gc():
                        hf.turns = _serialising
                        with _no_torch_crc32():
                            _fastsave().save(f.obj, hf)  # type: ignore[arg-type]
                finally:
                    if isinstance(hf, _DirectFile):
                        hf.close()
            except Exception as e:
                if hf.error is not None:  # the real cause (ENOSPC, EIO), not torch's rewording of it
                    raise hf.error from e
                raise
            written = time.perf_counter()
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        return self._record(f.relpath, hf.size, hasher, f.rank, f.kind), written, time.perf_counter()

    def write_torch(self, relpath: str, obj: Any, *, rank: int = 0, kind: str = "state") -> FileRecord:
        """``torch.save`` ``obj`` to ``relpath``, hashing while writing (no second read pass)."""
        return self.write_torch_many([TorchFile(relpath, obj, rank, kind)])[0]

    def write_torch_many(self, files: Sequence[TorchFile]) -> list[FileRecord]:
        """``torch.save`` several files at once, one thread each (fsync included).

        The files are plain ``torch.save`` zip archives (loadable by ``torch.load(weights_only=True)``)
        without torch's per-record CRC32: the recorded digest covers every byte instead.
        """
        if not files:
            return []
        start = time.perf_counter()
        if len(files) == 1 or not self.parallel:
            results = [self._save_one(f) for f in files]
        else:
            results = _run_threads([lambda f=f: self._save_one(f) for f in files])  # type: ignore[misc]
        written = max(r[1] for r in results)
        synced = max(r[2] for r in results)
        self.write_seconds += written - start
        self.sync_seconds += max(0.0, synced - written)
        return [r[0] for r in results]

    def write_bytes(self, relpath: str, data: bytes, *, rank: int = 0, kind: str = "state") -> FileRecord:
        path = self._open_file(relpath)
        hasher = new_hasher(self.hash_algorithm)
        hasher.update(data)
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            if self.fsync:
                os.fsync(f.fileno())
        return self._record(relpath, len(data), hasher, rank, kind)

    def finalize(self) -> None:
        """Make the directory entries durable before the rename."""
        start = time.perf_counter()
        if self.fsync:
            for sub in sorted({p.parent for p in self.tmp_dir.rglob("*")} | {self.tmp_dir}):
                fsync_dir(sub)
        self.sync_seconds += time.perf_counter() - start

    def abort(self) -> None:
        shutil.rmtree(self.tmp_dir, ignore_errors=True)


def read_token(d: Path) -> str | None:
    """The owner token in a directory's ``.ckptdb_token``, or None (no file, unreadable, empty)."""
    try:
        return (d / layout.TOKEN_FILE).read_text().strip() or None
    except OSError:
        return None


def publish(checkpoint_dir: Path, step_nr: int, token: str, *, fsync: bool = True) -> bool:
    """Rename ``step_<N>.tmp-<token>`` to ``step_<N>``; fsync ``checkpoint_dir``.

    When ``step_<N>`` already exists (an overwrite of a committed step), it is first renamed to
    ``step_<N>.old-<token>``; the caller removes that copy only after the catalog commit.
    Returns True when an old copy was moved aside.

    Raises:
        CheckpointError: a rename or the directory fsync failed. Whatever had moved was put back
            first (the new copy to ``step_<N>.tmp-<token>``, the committed copy to ``step_<N>``);
            the message says where the committed copy is when putting it back failed too.
    """
    tmp = checkpoint_dir / layout.tmp_dir_name(step_nr, token)
    final = checkpoint_dir / layout.step_dir_name(step_nr)
    old = checkpoint_dir / layout.old_dir_name(step_nr, token)
    moved_aside = False
    if final.exists():
        try:
            final.rename(old)
        except OSError as e:
            if final.exists() or not old.is_dir():  # the rename did not happen: nothing moved
                raise CheckpointError(
                    f"step {step_nr}: moving the committed copy aside failed ({e}); nothing was changed, "
                    f"the committed copy is intact in {str(final)!r}"
                ) from e
        moved_aside = True
        _hooks.hook("publish.after_rename_aside")
    try:
        tmp.rename(final)
        _hooks.hook("publish.after_rename")
        if fsync:
            fsync_dir(checkpoint_dir)
    except OSError as e:
        try:
            unpublish(checkpoint_dir, step_nr, token, moved_aside=moved_aside, fsync=fsync)
        except OSError as e2:
            raise CheckpointError(
                f"step {step_nr}: publishing the new copy failed ({e}) and putting the directories back "
                f"failed too ({e2}); {committed_copy_whereabouts(checkpoint_dir, step_nr, token, moved_aside)}"
            ) from e
        where = f"the committed copy is intact in {str(final)!r}" if moved_aside else "earlier checkpoints are intact"
        raise CheckpointError(f"step {step_nr}: publishing the new copy failed ({e}); {where}") from e
    return moved_aside


def unpublish(checkpoint_dir: Path, step_nr: int, token: str, *, moved_aside: bool, fsync: bool = True) -> None:
    """Undo :func:`publish` (as far as it got): the new copy back to ``step_<N>.tmp-<token>``, the
    committed copy from ``step_<N>.old-<token>`` back to ``step_<N>``; fsync ``checkpoint_dir``.

    Only directories carrying ``token`` (or its name) are moved; raises OSError when a move fails.
    """
    tmp = checkpoint_dir / layout.tmp_dir_name(step_nr, token)
    final = checkpoint_dir / layout.step_dir_name(step_nr)
    old = checkpoint_dir / layout.old_dir_name(step_nr, token)
    if not tmp.exists() and final.is_dir() and read_token(final) == token:
        final.rename(tmp)
    if moved_aside and old.is_dir() and not final.exists():
        old.rename(final)
    if fsync:
        fsync_dir(checkpoint_dir)


def committed_copy_whereabouts(checkpoint_dir: Path, step_nr: int, token: str, moved_aside: bool) -> str:
    """A sentence saying where the committed copy of a step is after a publish went wrong."""
    final = checkpoint_dir / layout.step_dir_name(step_nr)
    old = checkpoint_dir / layout.old_dir_name(step_nr, token)
    if not moved_aside:
        return "the checkpoint was not committed and earlier checkpoints are intact"
    if old.is_dir():
        return (
            f"the committed copy is intact in {str(old)!r}; the next open of this checkpoint directory "
            f"(or `ckptdb gc`) moves it back to {final.name!r}"
        )
    return f"the committed copy is intact in {str(final)!r}"


def to_trash(path: Path, step_nr: int, *, fsync: bool = True) -> Path:
    """Rename a directory to ``step_<N>.trash-<random>`` (one quick, atomic step); returns the new path.

    The caller removes the trash with :func:`remove_trash` (recovery removes any it finds).
    """
    trash = path.parent / layout.trash_dir_name(step_nr, os.urandom(6).hex())
    path.rename(trash)
    if fsync:
        fsync_dir(path.parent)
    return trash


def remove_trash(path: Path) -> None:
    """``rmtree`` a directory already renamed by :func:`to_trash`; raises when something refuses."""
    shutil.rmtree(path, ignore_errors=True)
    if path.exists():
        shutil.rmtree(path)


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

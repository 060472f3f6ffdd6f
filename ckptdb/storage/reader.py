"""Read checkpoint files back: size and digest checks, then a weights-only ``torch.load``."""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import pickle
import sys
import threading
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ckptdb.errors import CheckpointCorruptError, UnsafeCheckpointFileError
from ckptdb.storage import into as into_mod
from ckptdb.storage import layout, unpickle
from ckptdb.storage.checks import check_digest, check_file
from ckptdb.storage.hashing import new_hasher
from ckptdb.storage.writer import FileRecord


def load_torch(path: Path, step_nr: int, *, mmap: bool = True, trusted: bool = False) -> Any:
    """``torch.load(weights_only=True)``: never unpickle arbitrary objects (``unpickle.load``: the
    collector paused; with ``trusted``, the caller has just checked the digest of a file ckptdb wrote)."""
    try:
        return unpickle.load(path, mmap=mmap, trusted=trusted)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointFileError(
            f"checkpoint step {step_nr}: refusing to load {str(path)!r}: it holds objects a "
            f"weights-only load does not allow ({str(exc).splitlines()[0]})"
        ) from exc
    except (RuntimeError, EOFError, ValueError) as exc:
        raise CheckpointCorruptError(step_nr, str(path), "a readable torch file", str(exc).splitlines()[0]) from exc


# -- a verified mapped load: one read of the file, its digest taken from the mapped pages ----------

_MADV_POPULATE_READ = 22  # <linux/mman.h>, Linux 5.14+
_MADV_WILLNEED = 3
_WILLNEED = True
_POP_CHUNK = 32 << 20  # populated and hashed piece by piece, in order
_POP_THREADS = 4  # pieces being read in at once (parallel streams of one file)
_MAPPED_MIN = 64 << 20  # smaller files: hash first, then load (as before)
_MANY_RECORDS = 2048  # a trusted file of more zip records (tensors) than this: hash first, then the fast unpickler


def _zip_records(path: Path) -> int | None:
    """The number of records in the zip file at ``path`` (from its end-of-central-directory record,
    zip64 included; torch writes no archive comment); None when that cannot be read."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            if size < 22:
                return None
            f.seek(size - 22)
            eocd = f.read(22)
            if eocd[:4] != b"PK\x05\x06":
                return None
            n = int.from_bytes(eocd[10:12], "little")
            if n != 0xFFFF or size < 22 + 20:
                return n
            f.seek(size - 22 - 20)  # zip64 locator: where the zip64 end record is
            loc = f.read(20)
            if loc[:4] != b"PK\x06\x07":
                return None
            f.seek(int.from_bytes(loc[8:16], "little"))
            rec = f.read(56)
            return int.from_bytes(rec[32:40], "little") if rec[:4] == b"PK\x06\x06" else None
    except OSError:
        return None


def _prefetch_headers(path: Path) -> None:
    """Start reading, all at once, the local header of every zip record of ``path`` (a hint:
    ``POSIX_FADV_WILLNEED`` per header, from the central directory). A mapped ``torch.load`` reads
    each record's header to find its data, one cold read at a time otherwise: 40 ms -> 22 ms for
    the two files of a 0.25 GiB state. Any error: no hint."""
    try:
        with open(path, "rb") as f:
            infos = zipfile.ZipFile(f).infolist()
            for info in infos:
                os.posix_fadvise(f.fileno(), info.header_offset, mmap.PAGESIZE, os.POSIX_FADV_WILLNEED)
    except (OSError, ValueError, zipfile.BadZipFile, AttributeError):
        return


def _load_madvise() -> Callable[[int, int], int] | None:
    """``madvise(addr, len, MADV_POPULATE_READ)`` returning 0 or an errno; None off Linux."""
    if not sys.platform.startswith("linux") or os.environ.get("CKPTDB_NO_MAPPED_LOAD") == "1":
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int

    def populate(addr: int, nbytes: int) -> int:
        # WILLNEED first: the piece is read in large requests, asynchronously; the page faults of
        # POPULATE_READ alone would read it 128 KiB at a time (the mmap read-around window)
        if _WILLNEED:
            fn(addr, nbytes, _MADV_WILLNEED)
        return 0 if fn(addr, nbytes, _MADV_POPULATE_READ) == 0 else ctypes.get_errno() or -1

    return populate


_populate = _load_madvise()


def _first_storage_address(obj: Any) -> int | None:
    """The data address of the first non-empty CPU tensor storage in ``obj`` (containers walked)."""
    stack = [obj]
    while stack:
        v = stack.pop()
        if isinstance(v, torch.Tensor):
            st = v.untyped_storage()
            if v.device.type == "cpu" and st.nbytes() > 0:
                return int(st.data_ptr())
        elif isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, list | tuple):
            stack.extend(v)
    return None


def _mapping_of(path: Path, addr: int, size: int) -> int | None:
    """The start of this process's mapping of ``path`` (offset 0, at least ``size`` bytes) that
    holds ``addr`` (from /proc/self/maps); None when there is no such mapping."""
    st = os.stat(path)
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(None, 5)
                lo, _, hi = fields[0].partition("-")
                start, end = int(lo, 16), int(hi, 16)
                if not start <= addr < end:
                    continue
                major, _, minor = fields[3].partition(":")
                same = int(fields[4]) == st.st_ino and os.makedev(int(major, 16), int(minor, 16)) == st.st_dev
                if not same and len(fields) > 5:  # overlayfs and friends show the lower file's numbers
                    same = fields[5].strip() == os.path.realpath(path)
                if same and int(fields[2], 16) == 0 and end - start >= size:
                    return start
                return None
    except (OSError, ValueError, IndexError):
        return None
    return None


def _hash_mapping(base: int, size: int, algorithm: str) -> str | None:
    """The digest of ``size`` mapped bytes at ``base``: helper threads fault the pages in
    (``MADV_POPULATE_READ``: the reads, several pieces in flight) while this thread hashes each
    piece once it is in, in order. None when a piece could not be read in (the caller hashes the
    file with ``read()`` instead, so an I/O error is an error, not a SIGBUS)."""
    assert _populate is not None
    pieces = [(off, min(_POP_CHUNK, size - off)) for off in range(0, size, _POP_CHUNK)]
    ready = [threading.Event() for _ in pieces]
    failed: list[int] = []
    cursor = iter(range(len(pieces)))
    lock = threading.Lock()

    def run() -> None:
        while True:
            with lock:
                i = next(cursor, None)
            if i is None:
                return
            off, n = pieces[i]
            end = min(-(-(off + n) // mmap.PAGESIZE) * mmap.PAGESIZE, -(-size // mmap.PAGESIZE) * mmap.PAGESIZE)
            if _populate(base + off, end - off) != 0:
                failed.append(i)
            ready[i].set()

    threads = [threading.Thread(target=run, name=f"ckptdb-populate-{k}", daemon=True) for k in range(_POP_THREADS)]
    for t in threads:
        t.start()
    h = new_hasher(algorithm)
    try:
        for i, (off, n) in enumerate(pieces):
            ready[i].wait()
            if failed:
                return None
            h.update(memoryview((ctypes.c_char * n).from_address(base + off)).cast("B"))
    finally:
        for t in threads:
            t.join()
    return h.hexdigest()


def load_torch_checked(step_dir: Path, rec: FileRecord, step_nr: int) -> Any:
    """``torch.load(weights_only=True, mmap=True)`` of one file checked against its record, reading it
    once (see :func:`load_torch_checked_many`); raises what the check or the load raises."""
    (result,) = load_torch_checked_many(step_dir, [rec], step_nr)
    if isinstance(result, BaseException):
        raise result
    return result


def load_torch_checked_many(step_dir: Path, recs: Sequence[FileRecord], step_nr: int, *, into: Any = None) -> list[Any]:
    """Load several files of a step directory, each checked against its record and read once.

    Per file: the size is checked, then ``torch.load(weights_only=True, mmap=True)`` maps it (only
    the zip directory and the pickle are read), one file after the other (unpickling holds the
    GIL). Then the mapped pages of all the files are read in and hashed, the files in parallel
    threads, each by :func:`_hash_mapping` (several pieces in flight, hashed in order from
    memory), so the digest check, the read and the page faults of a later use are one pass.
    A file that fails to load is hashed with ``read()``: a digest mismatch is reported as the damage
    it is. Files under 64 MiB, hosts without ``MADV_POPULATE_READ``, and ``trusted`` records of
    files with many tensors (where unpickling, not reading, is the cost) are hashed first, then
    loaded; a ``trusted`` record's file is then unpickled by ``unpickle.load``'s fast path.

    With ``into`` (a state shaped like the files' objects, see :mod:`ckptdb.storage.into`), the
    tensors of each file at key paths ``into`` also has are loaded into ``into``'s tensors: a file
    of ``into.DIRECT_MIN`` bytes or more is read once straight into them (:func:`into.read_into`,
    hashed on the way), any other is loaded as above and then copied. Every pair is checked (dtype,
    shape) for every file before any byte is written into a target.

    Returns, per record in order, the loaded object or the exception its check or load raised
    (``CheckpointCorruptError`` on a mismatch; the object is then dropped). Loading stops at the
    first file that fails to load; the list ends there.
    """
    out: list[Any] = []
    pending: list[tuple[int, Path, FileRecord, int | None]] = []  # (index, path, record, mapping start)
    direct: list[tuple[int, Path, FileRecord, into_mod.Plan]] = []  # read straight into the targets
    copies: dict[int, list[into_mod.Pair]] = {}  # loaded first, copied into the targets once checked
    failed = False
    for i, rec in enumerate(recs):
        path = layout.shard_path(step_dir, rec.path, step_nr)
        try:
            fast = rec.trusted and unpickle.enabled()
            many = fast and (_zip_records(path) or 0) > _MANY_RECORDS
            small = rec.size_bytes < _MAPPED_MIN and (into is None or rec.size_bytes < into_mod.DIRECT_MIN)
            if _populate is None or small or many:
                check_file(step_dir, rec, step_nr)  # the digest before any unpickling
                obj = load_torch(path, step_nr, mmap=True, trusted=fast)
                if into is not None:
                    copies[i] = into_mod.pair_tensors(obj, into)
                out.append(obj)
                continue
            check_file(step_dir, rec, step_nr, digest=False)
            _prefetch_headers(path)
            try:
                obj = load_torch(path, step_nr, mmap=True)
            except (CheckpointCorruptError, UnsafeCheckpointFileError):
                check_digest(path, rec, step_nr, None)  # damage first: it says more than the load's error
                raise
            addr = _first_storage_address(obj)
            base = _mapping_of(path, addr, rec.size_bytes) if addr is not None else None
            if into is not None:
                plan = into_mod.plan(obj, into, base, rec.size_bytes) if base is not None else None
                if plan is not None:
                    direct.append((i, path, rec, plan))
                    out.append(obj)
                    continue
                copies[i] = into_mod.pair_tensors(obj, into)
        except Exception as e:  # noqa: BLE001 - returned in its place, the caller raises it
            out.append(e)
            failed = True
            break
        pending.append((i, path, rec, base))
        out.append(obj)

    def verify(job: tuple[int, Path, FileRecord, int | None]) -> None:
        i, path, rec, base = job
        try:
            actual = _hash_mapping(base, rec.size_bytes, rec.hash_algorithm) if base is not None else None
            check_digest(path, rec, step_nr, actual)
        except Exception as e:  # noqa: BLE001 - returned in its place, the caller raises it
            out[i] = e

    def read(job: tuple[int, Path, FileRecord, into_mod.Plan]) -> None:
        i, path, rec, plan = job
        try:
            actual = into_mod.read_into(path, rec.size_bytes, rec.hash_algorithm, plan.ranges, step_nr)
            check_digest(path, rec, step_nr, actual)
            into_mod.copy_pairs(plan.after)
            out[i] = into_mod.substitute(out[i], plan.repl)
        except Exception as e:  # noqa: BLE001 - returned in its place, the caller raises it
            out[i] = e

    jobs: list[Callable[[], None]] = [functools.partial(verify, j) for j in pending]
    if not failed:  # nothing is written into a target when a file failed to load or pair
        jobs += [functools.partial(read, j) for j in direct]
    if len(jobs) == 1:
        jobs[0]()
    else:
        threads = [threading.Thread(target=job, name=f"ckptdb-verify-{k}") for k, job in enumerate(jobs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if not any(isinstance(r, BaseException) for r in out):  # targets change only when the load succeeds
        for i, pairs in copies.items():
            into_mod.copy_pairs(pairs)
            out[i] = into_mod.substitute(out[i], {id(p.loaded): p.target for p in pairs})
    return out

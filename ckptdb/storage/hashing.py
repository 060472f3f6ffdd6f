"""Streaming hashes for checkpoint files.

The default is xxh3-128 (fast, non-cryptographic: catches corruption, not tampering). ``sha256``
and ``blake3`` are the cryptographic options. Each shard row records the algorithm it was written
with, so old rows keep verifying after the default changes.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

DEFAULT_ALGORITHM = "xxh3_128"
_CHUNK = 8 << 20


class Hasher(Protocol):
    def update(self, data: bytes | memoryview, /) -> None: ...
    def hexdigest(self) -> str: ...


def available_algorithms() -> list[str]:
    algos = ["sha256"]
    try:
        import xxhash  # noqa: F401

        algos.insert(0, "xxh3_128")
    except ImportError:  # pragma: no cover - xxhash is a dependency
        pass
    try:
        import blake3  # noqa: F401

        algos.append("blake3")
    except ImportError:
        pass
    return algos


def new_hasher(algorithm: str) -> Hasher:
    """A fresh hasher for ``algorithm``; ValueError names the choices when it is unknown."""
    if algorithm == "xxh3_128":
        import xxhash

        return xxhash.xxh3_128()
    if algorithm == "sha256":
        return hashlib.sha256()
    if algorithm == "blake3":
        try:
            import blake3
        except ImportError as exc:
            raise ValueError("hash algorithm 'blake3' needs the blake3 package") from exc
        return blake3.blake3()  # type: ignore[return-value]
    raise ValueError(f"unknown hash algorithm {algorithm!r}; choose one of {', '.join(available_algorithms())}")


_SEGMENT = 1 << 30  # read-ahead helpers stay within this much of the hash
_HELPERS = 2  # read-ahead threads per file (each its own fd and contiguous range: the kernel's
# read-ahead sees sequential reads, as in the fastest raw cold read of benchmarks/limits.py)


def hash_file(
    path: Path, algorithm: str, progress: Callable[[int], None] | None = None, *, readahead: bool = False
) -> tuple[int, str]:
    """Read ``path`` once and return (size in bytes, hex digest); ``progress`` gets each chunk's size.

    ``readahead=True``: helper threads read the file ahead into the page cache (each a contiguous
    range of the current 1 GiB segment, with its own fd, into a reused buffer) while this thread
    hashes in order from the cache: several sequential streams in flight, the same digest, and the
    file resident for the load that follows. Files under 64 MiB are read by this thread alone.
    """
    h = new_hasher(algorithm)
    size = 0
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        ahead = _ReadAhead(path, os.fstat(f.fileno()).st_size) if readahead else None
        try:
            while True:
                n = f.readinto(buf)
                if not n:
                    break
                h.update(view[:n])
                size += n
                if ahead is not None:
                    ahead.hashed(size)
                if progress is not None:
                    progress(n)
        finally:
            if ahead is not None:
                ahead.stop()
    return size, h.hexdigest()


class _ReadAhead:
    """Helper threads that read a file ahead of its hash (errors are left to the hashing read)."""

    def __init__(self, path: Path, size: int) -> None:
        self._cond = threading.Condition()
        self._hashed = 0
        self._stopped = False
        self._threads: list[threading.Thread] = []
        if size < 8 * _CHUNK:
            return
        segs = [(lo, min(size, lo + _SEGMENT)) for lo in range(0, size, _SEGMENT)]
        for i in range(_HELPERS):
            parts = []
            for lo, hi in segs:
                a = lo + (hi - lo) * i // _HELPERS
                b = lo + (hi - lo) * (i + 1) // _HELPERS
                if a < b:
                    parts.append((lo, a, b))
            t = threading.Thread(target=self._run, args=(path, parts), name=f"ckptdb-readahead-{i}", daemon=True)
            self._threads.append(t)
            t.start()

    def hashed(self, n: int) -> None:
        if self._threads and n // _SEGMENT != (n - _CHUNK) // _SEGMENT:
            with self._cond:
                self._hashed = n
                self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        for t in self._threads:
            t.join()

    def _run(self, path: Path, parts: list[tuple[int, int, int]]) -> None:
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            return
        try:
            buf = bytearray(_CHUNK)
            for seg, lo, hi in parts:
                with self._cond:  # at most one segment ahead of the hash
                    while not self._stopped and self._hashed + _SEGMENT < seg:
                        self._cond.wait()
                    if self._stopped:
                        return
                pos = lo
                while pos < hi and not self._stopped:
                    n = os.preadv(fd, [memoryview(buf)[: min(_CHUNK, hi - pos)]], pos)
                    if n <= 0:
                        return
                    pos += n
        except OSError:
            return  # the hashing read reports the error
        finally:
            os.close(fd)

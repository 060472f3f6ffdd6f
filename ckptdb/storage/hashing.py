"""Streaming hashes for checkpoint files.

The default is xxh3-128 (fast, non-cryptographic: catches corruption, not tampering). ``sha256``
and ``blake3`` are the cryptographic options. Each shard row records the algorithm it was written
with, so old rows keep verifying after the default changes.
"""

from __future__ import annotations

import hashlib
import os
import queue
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


def hash_file(
    path: Path, algorithm: str, progress: Callable[[int], None] | None = None, *, streams: int = 1
) -> tuple[int, str]:
    """Read ``path`` once and return (size in bytes, hex digest); ``progress`` gets each chunk's size.

    ``streams`` > 1: that many threads read the file's 8 MiB chunks ahead (chunk k by thread
    k % streams, each into two buffers of its own) while this thread hashes them in order: several
    reads in flight, the same digest. The reads go through the page cache, so a load that follows
    finds the file resident.
    """
    size = os.stat(path).st_size
    if streams > 1 and size > 2 * _CHUNK:
        return _hash_file_parallel(path, algorithm, progress, min(streams, -(-size // _CHUNK)))
    h = new_hasher(algorithm)
    size = 0
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
            size += n
            if progress is not None:
                progress(n)
    return size, h.hexdigest()


_Item = tuple[bytearray, int] | BaseException | None


def _hash_file_parallel(
    path: Path, algorithm: str, progress: Callable[[int], None] | None, streams: int
) -> tuple[int, str]:
    h = new_hasher(algorithm)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    stop = threading.Event()
    full: list[queue.SimpleQueue[_Item]] = [queue.SimpleQueue() for _ in range(streams)]
    free: list[queue.SimpleQueue[bytearray]] = [queue.SimpleQueue() for _ in range(streams)]
    for q in free:
        q.put(bytearray(_CHUNK))
        q.put(bytearray(_CHUNK))

    def reader(i: int) -> None:
        k = i
        try:
            while not stop.is_set():
                buf = free[i].get()
                if stop.is_set():
                    return
                n = 0
                while n < _CHUNK:  # a short read is retried; 0 bytes is the end of the file
                    got = os.preadv(fd, [memoryview(buf)[n:]], k * _CHUNK + n)
                    if got == 0:
                        break
                    n += got
                full[i].put((buf, n))
                if n < _CHUNK:
                    return
                k += streams
        except BaseException as e:  # noqa: BLE001 - raised by the hashing thread
            full[i].put(e)

    threads = [threading.Thread(target=reader, args=(i,), name=f"ckptdb-read-{i}", daemon=True) for i in range(streams)]
    for t in threads:
        t.start()
    total = 0
    try:
        k = 0
        while True:
            item = full[k % streams].get()
            if isinstance(item, BaseException):
                raise item
            assert item is not None
            buf, n = item
            if n:
                h.update(memoryview(buf)[:n])
                total += n
                if progress is not None:
                    progress(n)
            free[k % streams].put(buf)
            if n < _CHUNK:
                break
            k += 1
    finally:
        stop.set()
        for q in free:
            q.put(bytearray(0))  # wake a reader waiting for a buffer
        for t in threads:
            t.join()
        os.close(fd)
    return total, h.hexdigest()

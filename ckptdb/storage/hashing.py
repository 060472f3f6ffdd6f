"""Streaming hashes for checkpoint files.

The default is xxh3-128 (fast, non-cryptographic: catches corruption, not tampering). ``sha256``
and ``blake3`` are the cryptographic options. Each shard row records the algorithm it was written
with, so old rows keep verifying after the default changes.
"""

from __future__ import annotations

import hashlib
import os
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


_WINDOW = 256 << 20  # readahead advice: this far ahead of the hash


def hash_file(
    path: Path, algorithm: str, progress: Callable[[int], None] | None = None, *, readahead: bool = False
) -> tuple[int, str]:
    """Read ``path`` once and return (size in bytes, hex digest); ``progress`` gets each chunk's size.

    ``readahead=True``: ask the kernel to read the file ahead (``POSIX_FADV_WILLNEED``, 256 MiB
    windows kept ahead of the hash), so many reads are in flight while this thread hashes in order
    (about twice as fast cold as plain sequential reads here, docs/benchmarks.md) and the file ends
    up resident in the page cache for the load that follows.
    """
    h = new_hasher(algorithm)
    size = 0
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    advise = readahead and hasattr(os, "posix_fadvise")
    with open(path, "rb", buffering=0) as f:
        advised = 0
        while True:
            if advise and advised - size < _WINDOW:
                try:
                    os.posix_fadvise(f.fileno(), advised, _WINDOW, os.POSIX_FADV_WILLNEED)
                except OSError:
                    advise = False
                advised += _WINDOW
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
            size += n
            if progress is not None:
                progress(n)
    return size, h.hexdigest()

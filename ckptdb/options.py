"""Options as small frozen dataclasses (one object per concern, no flag piles)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from ckptdb.storage.hashing import DEFAULT_ALGORITHM


@dataclass(frozen=True, kw_only=True, slots=True)
class SaveOptions:
    """How checkpoints are written.

    Attributes:
        fsync: fsync every file and directory before the commit (turn off only for throwaway runs).
        hash_algorithm: ``"xxh3_128"`` (fast, catches corruption), ``"sha256"`` or ``"blake3"``
            (cryptographic, tamper evidence). Recorded per file.
    """

    fsync: bool = True
    hash_algorithm: str = DEFAULT_ALGORITHM


@dataclass(frozen=True, kw_only=True, slots=True)
class LoadOptions:
    """How checkpoints are read.

    Attributes:
        verify: ``"digest"`` (sizes and hashes, the default) or ``"size"`` (sizes only, faster).
            File sizes are checked on every load whatever this says.
        mmap: memory-map files instead of reading them into memory.
        fallback: ``load_last_checkpoint()`` skips a corrupt or missing newest checkpoint (with a
            warning, recorded in the catalog) and returns the newest intact one. ``False`` raises.
    """

    verify: str = "digest"
    mmap: bool = True
    fallback: bool = True

    def __post_init__(self) -> None:
        if self.verify not in ("digest", "size"):
            raise ValueError(f"LoadOptions.verify must be 'digest' or 'size', not {self.verify!r}")


@dataclass(frozen=True, kw_only=True, slots=True)
class RecoveryOptions:
    """What opening a manager does about a crashed writer.

    Attributes:
        on_open: run recovery when the manager opens (roll back dead writers, remove debris).
        stale_after: a pending checkpoint of a writer on *another host* is considered dead when
            its heartbeat is older than this (writers on this host are checked by pid).
    """

    on_open: bool = True
    stale_after: timedelta = timedelta(hours=2)

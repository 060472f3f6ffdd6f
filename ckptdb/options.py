"""Options as small frozen dataclasses (one object per concern, no flag piles)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from ckptdb.errors import InvalidArgumentError
from ckptdb.storage.hashing import DEFAULT_ALGORITHM


@dataclass(frozen=True, kw_only=True, slots=True)
class SaveOptions:
    """How checkpoints are written.

    Attributes:
        fsync: fsync every file and directory before the commit (turn off only for throwaway runs).
        hash_algorithm: ``"xxh3_128"`` (fast, catches corruption), ``"sha256"`` or ``"blake3"``
            (cryptographic, tamper evidence). Recorded per file.
        blocking: ``False`` makes saves asynchronous (single process): ``save_state`` copies the
            state into host staging buffers (reused from one save to the next; pinned for GPU
            tensors) and ``commit_checkpoint()`` returns at once while writing, hashing, fsync and
            the catalog commit go on in a background thread. The next ``begin_checkpoint`` (and
            every other manager call) waits for it; its error, if any, is raised there and by
            ``manager.wait()``. Costs one staged copy of the state in memory.
            ``commit_checkpoint(blocking=...)`` overrides this per call.
        parallel_files: write a save's files (``model.pt`` and ``rank_0.pt``) in parallel threads.
    """

    fsync: bool = True
    hash_algorithm: str = DEFAULT_ALGORITHM
    blocking: bool = True
    parallel_files: bool = True


@dataclass(frozen=True, kw_only=True, slots=True)
class LoadOptions:
    """How checkpoints are read.

    Attributes:
        verify: ``"digest"`` (sizes and hashes, the default) or ``"size"`` (sizes only, faster).
            File sizes are checked on every load whatever this says.
        mmap: memory-map files instead of reading them into memory: the load returns without
            reading tensor data (pages are read when first touched). With ``verify="digest"``
            every file is still read once, to hash it, before the load returns; use
            ``verify="size"`` for a load that returns in milliseconds whatever the size (sizes are
            checked; a flipped byte inside a file is then not detected by that load).
        fallback: ``load_last_checkpoint()`` skips a corrupt or missing newest checkpoint (with a
            warning, recorded in the catalog) and returns the newest intact one. ``False`` raises.
    """

    verify: str = "digest"
    mmap: bool = True
    fallback: bool = True

    def __post_init__(self) -> None:
        if self.verify not in ("digest", "size"):
            raise InvalidArgumentError(f"LoadOptions.verify must be 'digest' or 'size', not {self.verify!r}")


@dataclass(frozen=True, kw_only=True, slots=True)
class RecoveryOptions:
    """What opening a manager does about a crashed writer.

    Attributes:
        on_open: run recovery when the manager opens (roll back dead writers, remove debris).
        stale_after: a pending checkpoint whose writer cannot be checked by pid is considered
            dead when its heartbeat is older than this. Pids are checked only for writers on this
            host, this boot and in this pid namespace; a writer on another host or in another
            container (another pid namespace, e.g. containers sharing the node's hostname) is
            judged by its heartbeat, written by ``begin_checkpoint``, ``save_state``,
            ``save_metadata`` and ``commit_checkpoint`` (at most once a minute). Such a writer
            that stays longer than this between two of those calls (idle between begin and commit,
            or one save or commit taking that long) is rolled back, and its commit then fails:
            keep it well above your longest save.
    """

    on_open: bool = True
    stale_after: timedelta = timedelta(hours=2)

"""Small frozen values the catalog hands out; the ORM never leaves the catalog package."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


@dataclass(frozen=True, slots=True)
class RunInfo:
    id: int
    name: str
    checkpoint_dir: str
    created_at: datetime
    model_metadata: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class ShardInfo:
    path: str
    size_bytes: int
    hash_algorithm: str
    digest: str
    rank: int = 0
    kind: str = "state"
    removed: bool = False
    remote_checksum: str | None = None  # the object store's full-object checksum ("crc32c:<base64>")


# ``torch_version`` of a checkpoint adopted by ``ckptdb import`` (documented in docs/sql.md): its
# files were written by someone else, so their digests say only what was found, not what ckptdb wrote
IMPORTED_TORCH_VERSION = "unknown"


@dataclass(frozen=True, slots=True)
class WriterInfo:
    """Who writes a checkpoint: recorded for reproducibility and for dead-writer detection."""

    host: str
    pid: int
    start_time: int | None
    ckptdb_version: str
    torch_version: str
    python_version: str
    world_size: int = 1
    boot_id: str | None = None  # /proc/sys/kernel/random/boot_id: pids of another boot mean nothing
    pid_ns: int | None = None  # inode of the writer's pid namespace: pids of another container mean nothing


@dataclass(frozen=True, slots=True)
class SaveTimings:
    """What one save cost, in wall-clock seconds (recorded on the checkpoint row at commit).

    Attributes:
        stage_seconds: copying the state into staging buffers (asynchronous saves; 0 otherwise).
        write_seconds: serialising, hashing and writing the files (writeback streams meanwhile).
        sync_seconds: the final fsyncs of files and directories.
        commit_started: ``time.perf_counter()`` when the commit phase (score file, rename,
            catalog transaction) began; the catalog turns it into ``commit_seconds``.
    """

    stage_seconds: float
    write_seconds: float
    sync_seconds: float
    commit_started: float


@dataclass(frozen=True, slots=True)
class CheckpointInfo:
    id: int
    run_id: int
    step_nr: int
    state: str
    token: str
    directory: str
    created_at: datetime
    committed_at: datetime | None
    writer_host: str
    writer_pid: int
    writer_start_time: int | None
    heartbeat_at: datetime
    world_size: int
    hash_algorithm: str
    total_bytes: int | None
    file_count: int | None
    model_preserved: bool
    deleted_at: datetime | None = None
    delete_reason: str | None = None
    verified_at: datetime | None = None
    verify_result: str | None = None
    ckptdb_version: str = ""
    torch_version: str = ""
    user_metadata: dict[str, Any] | None = None
    scores: dict[str, float | None] = field(default_factory=dict)
    stage_seconds: float | None = None
    write_seconds: float | None = None
    sync_seconds: float | None = None
    commit_seconds: float | None = None
    writer_boot_id: str | None = None
    writer_pid_ns: int | None = None

    @property
    def saved_by_ckptdb(self) -> bool:
        """Written by ckptdb's save (not adopted by ``ckptdb import``): a file whose digest matches
        holds exactly the bytes ckptdb's writer wrote."""
        return self.torch_version != IMPORTED_TORCH_VERSION

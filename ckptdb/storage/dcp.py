"""Sharded state (FSDP2 ``fully_shard``, DTensor, ShardedTensor) through ``torch.distributed.checkpoint``.

DCP does the hard part: planning which rank writes which shard, deduplicating replicated values,
writing one file per rank plus a global ``.metadata``, and resharding on load to whatever world
size and mesh the caller's state dict has. ckptdb adds what DCP leaves out:

* the files go into the checkpoint's temporary step directory (``step_<N>.tmp-<token>/sharded/``),
  so the same rename and catalog transaction that publish the per-rank files publish them too;
* every byte written is hashed on its way to disk (a hashing stream under DCP's writer, no second
  read pass); each rank hands its :class:`~ckptdb.storage.writer.FileRecord` s to the commit;
* on load, every file a rank reads is checked against the catalog's size (and digest, unless
  ``verify="size"``) first; ``.metadata``, a full pickle, is unpickled only after its digest matches,
  whatever ``verify`` says, and non-tensor values are unpickled weights-only
  (:class:`WeightsOnlyLoadPlanner`).

Call order (inside :meth:`FileCheckpointManager.save_state` / ``load_*``; all ranks together)::

    save_sharded(state, tmp_step_dir, ...)  -> {relpath: FileRecord} written by this rank
    load_sharded(state, step_dir, records, ...)   # in place, resharding to the caller's layout
"""

from __future__ import annotations

import io
import os
import pickle
import threading
import warnings
from collections.abc import Generator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem
from torch.futures import Future

from ckptdb.errors import CheckpointCorruptError, UnsafeCheckpointFileError
from ckptdb.storage import layout
from ckptdb.storage.checks import check_file
from ckptdb.storage.hashing import Hasher, new_hasher
from ckptdb.storage.sharded import _NO_DIST_WARNING, KIND, METADATA_NAME, SHARDED_DIR
from ckptdb.storage.writer import FileRecord


class _HashingStream(io.RawIOBase):
    """A binary write stream that hashes and counts what passes through it to the real file."""

    def __init__(self, f: io.BufferedWriter, hasher: Hasher) -> None:
        super().__init__()
        self._f = f
        self._hasher = hasher
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        self._hasher.update(view)
        n = self._f.write(view)
        self.size += len(view)
        return int(n) if n is not None else len(view)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self._f.flush()

    def fileno(self) -> int:
        self._f.flush()  # DCP fsyncs through fileno(): make sure our buffer reached the OS first
        return self._f.fileno()


class _HashingFileSystem(FileSystem):
    """DCP's local file system, recording (size, digest) of every file written below ``root``."""

    def __init__(self, root: Path, step_root: Path, hash_algorithm: str, rank: int) -> None:
        super().__init__()
        self.root = root
        self.step_root = step_root
        self.hash_algorithm = hash_algorithm
        self.rank = rank
        self.records: dict[str, FileRecord] = {}
        self._lock = threading.Lock()  # DCP may write from several threads (thread_count > 1)

    def _rel(self, path: str | os.PathLike[str]) -> str:
        return Path(path).relative_to(self.step_root).as_posix()

    @contextmanager
    def create_stream(self, path: str | os.PathLike[str], mode: str) -> Generator[io.IOBase, None, None]:
        if "w" not in mode:
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        hasher = new_hasher(self.hash_algorithm)
        with open(path, mode) as f:
            stream = _HashingStream(cast(io.BufferedWriter, f), hasher)
            yield cast(io.IOBase, stream)
            f.flush()
            rec = FileRecord(self._rel(path), stream.size, self.hash_algorithm, hasher.hexdigest(), self.rank, KIND)
        with self._lock:
            self.records[rec.path] = rec

    def rename(self, path: str | os.PathLike[str], new_path: str | os.PathLike[str]) -> None:
        super().rename(path, new_path)  # DCP writes .metadata.tmp, then renames it
        with self._lock:
            rec = self.records.pop(self._rel(path), None)
            if rec is not None:
                self.records[self._rel(new_path)] = FileRecord(
                    self._rel(new_path), rec.size_bytes, rec.hash_algorithm, rec.digest, rec.rank, rec.kind
                )

    def rm_file(self, path: str | os.PathLike[str]) -> None:
        super().rm_file(path)
        with self._lock:
            self.records.pop(self._rel(path), None)


class HashingStorageWriter(FileSystemWriter):
    """DCP's ``FileSystemWriter`` writing into a step's temporary directory, hashing every file.

    Call order (driven by ``dcp.save``): ``set_up_storage_writer`` -> ``prepare_local_plan`` ->
    ``prepare_global_plan`` (coordinator) -> ``write_data`` -> ``finish`` (coordinator). Afterwards
    :attr:`records` holds this rank's files, relative to the step directory.
    """

    def __init__(self, step_tmp_dir: Path, *, rank: int, hash_algorithm: str, fsync: bool = True) -> None:
        root = step_tmp_dir / SHARDED_DIR
        super().__init__(root, single_file_per_rank=True, sync_files=fsync, overwrite=False)
        self.fs = _HashingFileSystem(root, step_tmp_dir, hash_algorithm, rank)

    @property
    def records(self) -> dict[str, FileRecord]:
        return cast(_HashingFileSystem, self.fs).records


class VerifyingStorageReader(FileSystemReader):
    """DCP's ``FileSystemReader`` over a committed step, checking each file against the catalog.

    ``.metadata`` is digest-checked before it is unpickled, always; a data file is checked (size,
    and digest unless ``verify="size"``) the first time this rank reads from it. A mismatch raises
    :class:`~ckptdb.errors.CheckpointCorruptError`.
    """

    def __init__(self, step_dir: Path, records: Mapping[str, FileRecord], step_nr: int, *, verify: str) -> None:
        super().__init__(step_dir / SHARDED_DIR)
        self.step_dir = step_dir
        self.expected = dict(records)
        self.step_nr = step_nr
        self.verify = verify
        self._checked: set[str] = set()
        self.error: CheckpointCorruptError | None = None

    def _check(self, relpath: str) -> None:
        rel = f"{SHARDED_DIR}/{relpath}"
        layout.shard_path(self.step_dir, rel, self.step_nr)  # never read outside the step directory
        if self.verify == "none" or rel in self._checked:
            return
        rec = self.expected.get(rel)
        if rec is None:
            raise CheckpointCorruptError(
                self.step_nr, str(self.step_dir / rel), "a file recorded in the catalog", "an unrecorded file"
            )
        check_file(self.step_dir, rec, self.step_nr, digest=self.verify == "digest")
        self._checked.add(rel)

    def _failed(self, path: Path, expected: str, actual: str, *, missing: bool = False) -> CheckpointCorruptError:
        # DCP may wrap this error in its own (e.g. after falling back to per-rank metadata):
        # load_sharded raises the one kept here instead
        self.error = CheckpointCorruptError(self.step_nr, str(path), expected, actual, missing=missing)
        return self.error

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        """Read ``.metadata`` (a full pickle: DCP's dataclasses) and unpickle it only once its bytes match.

        The bytes are read once, their size and digest compared with the catalog whatever
        ``verify`` says, and the same bytes unpickled: a file swapped for a same-size hostile
        pickle is refused before anything in it runs.
        """
        rank = kwargs.get("rank")
        name = METADATA_NAME if rank is None else f"__{rank}{METADATA_NAME}"
        rel = f"{SHARDED_DIR}/{name}"
        rec = self.expected.get(rel)
        path = self.step_dir / rel
        if rec is None:
            if rank is not None:  # DCP's fallback to per-rank metadata, which ckptdb never writes
                raise FileNotFoundError(str(path))
            raise self._failed(path, "a file recorded in the catalog", "an unrecorded file")
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise self._failed(path, f"{rec.size_bytes} bytes", "no file", missing=True) from None
        if len(data) != rec.size_bytes:
            raise self._failed(path, f"{rec.size_bytes} bytes", f"{len(data)} bytes")
        hasher = new_hasher(rec.hash_algorithm)
        hasher.update(memoryview(data))
        if hasher.hexdigest() != rec.digest:
            raise self._failed(path, f"{rec.hash_algorithm}:{rec.digest}", f"{rec.hash_algorithm}:{hasher.hexdigest()}")
        self._checked.add(rel)
        metadata = pickle.loads(data)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        for item in plan.items:
            self._check(self.storage_data[item.storage_index].relative_path)
        return super().read_data(plan, planner)


class WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, except that non-tensor values are unpickled weights-only.

    DCP writes every non-tensor value of a sharded state (``step`` counters, ``param_groups``)
    with ``torch.save`` and reads it back with a full unpickler; ckptdb accepts at save only
    values a weights-only load rebuilds, so nothing else needs to be trusted at load.
    """

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as exc:
            raise UnsafeCheckpointFileError(
                f"refusing to load the sharded value {read_item.dest_index.fqn!r}: it holds objects a "
                f"weights-only load does not allow ({str(exc).splitlines()[0]})"
            ) from exc
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def _unwrap(e: CheckpointException) -> Exception:
    """DCP gathers every rank's failure into one BaseException; surface the lowest rank's error."""
    for _, (exc, _trace) in sorted(e.failures.items()):
        if isinstance(exc, Exception):
            return exc
    return RuntimeError(str(e))


def save_sharded(
    state: dict[str, Any],
    step_tmp_dir: Path,
    *,
    rank: int,
    process_group: Any,
    hash_algorithm: str,
    fsync: bool = True,
) -> dict[str, FileRecord]:
    """``dcp.save`` ``state`` into ``step_tmp_dir/sharded/``; returns the files this rank wrote.

    ``process_group=None`` means one process without torch.distributed (DCP's ``no_dist``).
    Collective: every rank of ``process_group`` calls it with the same keys.
    """
    writer = HashingStorageWriter(step_tmp_dir, rank=rank, hash_algorithm=hash_algorithm, fsync=fsync)
    try:
        with warnings.catch_warnings():
            # one process without a process group is intended here, not a misconfiguration
            warnings.filterwarnings("ignore", message=_NO_DIST_WARNING)
            dcp.save(state, storage_writer=writer, process_group=process_group, no_dist=process_group is None)
    except CheckpointException as e:
        raise _unwrap(e) from None
    return writer.records


def load_sharded(
    state: dict[str, Any],
    step_dir: Path,
    records: Mapping[str, FileRecord],
    step_nr: int,
    *,
    process_group: Any,
    verify: str = "digest",
) -> None:
    """``dcp.load`` into ``state`` in place, resharding to its layout (any world size or mesh).

    Values of ``state`` must already have their target type and placement (DTensors of the
    current mesh, plain tensors, optimizer state initialised); ``records`` are the catalog's rows
    for ``sharded/`` files.
    """
    reader = VerifyingStorageReader(step_dir, records, step_nr, verify=verify)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_NO_DIST_WARNING)
            dcp.load(
                state,
                storage_reader=reader,
                planner=WeightsOnlyLoadPlanner(),
                process_group=process_group,
                no_dist=process_group is None,
            )
    except CheckpointException as e:
        if reader.error is not None:
            raise reader.error from None
        raise _unwrap(e) from None


def full_model_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's full state dict on CPU: DTensor / FSDP2 shards gathered (collective on their mesh).

    Every rank of the model's mesh must call this; each gets the full tensors (one at a time is
    materialised, so peak memory is one full parameter beyond the shards).
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.tensor import DTensor

    out: dict[str, Any] = {}
    for k, v in get_model_state_dict(model).items():
        if isinstance(v, DTensor):
            v = v.full_tensor()
        out[k] = v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v
    return out


__all__ = [
    "HashingStorageWriter",
    "VerifyingStorageReader",
    "WeightsOnlyLoadPlanner",
    "full_model_state_dict",
    "load_sharded",
    "save_sharded",
]

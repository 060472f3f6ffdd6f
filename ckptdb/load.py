"""The load path of a manager: find the committed row, check its files, load them, fall back past damage.

Decisions come from the catalog (rank 0 reads the row and its file list and hands them to every
rank); bytes are read through the run's :class:`~ckptdb.storage.store.Store`. Every rank checks
the sizes (and, with ``verify="digest"``, the digests) of the files it is about to load against the
catalog first; a mismatch found on any rank is recorded by rank 0 as ``corrupt`` or ``missing``
(:meth:`Loader.mark_damaged`), and ``load_last_checkpoint`` then falls back to the next older
intact checkpoint (``LoadOptions(fallback=False)`` raises instead).

Call order (facade: :class:`~ckptdb.manager.FileCheckpointManager`)::

    load_checkpoint(step)        committed(step) on rank 0 -> load_state on every rank
    load_last_checkpoint()       newest committed -> load_state; damaged: mark, try the next older one
    load_sharded_state(step, sd) committed(step) -> DCP load into sd (collective)
    load_metadata(step)          metadata.pt of one step
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from ckptdb.catalog import CheckpointInfo, ShardInfo
from ckptdb.catalog.models import State
from ckptdb.context import RunContext
from ckptdb.distributed import process_group_of, run_on_all
from ckptdb.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointNotFoundError,
    UnsafeCheckpointFileError,
)
from ckptdb.recovery import set_aside_copy
from ckptdb.storage import into as into_mod
from ckptdb.storage import layout
from ckptdb.storage.sharded import SHARDED_DIR
from ckptdb.storage.writer import FileRecord
from ckptdb.verify import directory_unavailable

log = logging.getLogger("ckptdb")

MODEL_KEY_ENTRY = "model_key"  # fairseq2's bookkeeping entry in model.pt / rank files, never user state


def mark_damaged(ctx: RunContext, info: CheckpointInfo, e: CheckpointCorruptError) -> None:
    """Rank 0: record ``info`` as ``missing`` or ``corrupt`` (unless the whole directory is gone,
    or its copy is only set aside by an unfinished overwrite); a catalog failure is logged."""
    if not ctx.is_coordinator:
        return
    if not ctx.store.is_local:  # nothing is ever unmounted or set aside on an object store
        state = State.MISSING if (e.missing and not ctx.store.exists(info.directory)) else State.CORRUPT
        try:
            ctx.catalog.mark_damaged(info.id, state, str(e), ctx.who)
        except CheckpointError as err:
            log.warning("ckptdb: could not record damage of step %d: %s", info.step_nr, err)
        return
    if e.missing and directory_unavailable(ctx.catalog, ctx.run, ctx.checkpoint_dir) is not None:
        return  # the whole directory is gone or empty (unmounted?): not this checkpoint's damage
    aside = set_aside_copy(ctx.checkpoint_dir, info)
    if aside is not None:  # its copy is set aside by an overwrite (or a failed one): not damage
        log.warning("ckptdb: step %d: its committed copy is at %s (an overwrite stopped)", info.step_nr, aside)
        return
    state = State.MISSING if (e.missing and not ctx.store.exists(info.directory)) else State.CORRUPT
    try:
        ctx.catalog.mark_damaged(info.id, state, str(e), ctx.who)
    except CheckpointError as err:
        log.warning("ckptdb: could not record damage of step %d: %s", info.step_nr, err)


class Loader:
    """Reads a run's committed checkpoints for one rank (see the module docstring)."""

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx

    def committed(self, step_nr: int) -> tuple[CheckpointInfo, list[ShardInfo]]:
        """The live committed row of ``step_nr`` and its files (rank 0: a catalog read)."""
        ctx = self.ctx
        live = ctx.catalog.live(ctx.run.id, step_nr)
        if live is None or live.state == State.DELETING.value:
            raise CheckpointNotFoundError(
                f"step {step_nr} has no committed checkpoint in run {ctx.run_name!r}", step_nr=step_nr
            )
        if live.state in (State.CORRUPT.value, State.MISSING.value):
            raise CheckpointCorruptError(
                step_nr,
                ctx.store.describe(live.directory),
                "an intact checkpoint",
                f"state {live.state!r} in the catalog",
                missing=live.state == State.MISSING.value,
            )
        return live, ctx.catalog.shards(live.id)

    def verify_and_mark(self, info: CheckpointInfo, shards: list[ShardInfo], verify: str) -> None:
        """Check the files' sizes (always) and digests (unless ``verify="size"``); record damage."""
        store = self.ctx.store
        recs = [
            FileRecord(s.path, s.size_bytes, s.hash_algorithm, s.digest, checksum=s.remote_checksum) for s in shards
        ]
        try:
            directory = store.check_directory(info.step_nr, info.directory)
            owner = store.owner(directory)
            if owner is not None and owner != info.token:  # another row's copy (an overwrite mid-way)
                raise CheckpointCorruptError(
                    info.step_nr,
                    store.describe(directory),
                    f"the copy of checkpoint #{info.id}",
                    "another checkpoint's copy",
                    missing=True,
                )
            store.check_files(directory, recs, info.step_nr, digest=verify == "digest")
        except CheckpointCorruptError as e:
            self.mark_damaged(info, e)
            raise

    def mark_damaged(self, info: CheckpointInfo, e: CheckpointCorruptError) -> None:
        mark_damaged(self.ctx, info, e)

    def digest_on_load(self, verify: str) -> bool:
        """Whether digests are checked by :meth:`load_file` on the bytes it loads rather than by
        :meth:`verify_and_mark` beforehand: on a store that fetches whole files into memory to load
        them (an object store), so that each file is downloaded once, not twice."""
        return verify == "digest" and self.ctx.store.hashes_on_load

    def load_file(self, info: CheckpointInfo, directory: str, s: ShardInfo, *, check_digest: bool = False) -> Any:
        """``torch.load(weights_only=True)`` one file of ``info``; damage and hostile pickles are recorded.

        ``check_digest``: the store checks the file's size and digest against the catalog on the
        bytes it loads (see :meth:`digest_on_load`)."""
        try:
            return self._load(info, directory, s, check_digest)
        except (CheckpointCorruptError, UnsafeCheckpointFileError) as e:
            self._record_failure(info, s, e)
            raise

    def load_files(
        self, info: CheckpointInfo, directory: str, shards: list[ShardInfo], *, check_digest: bool, into: Any = None
    ) -> list[Any]:
        """:meth:`load_file` of each of ``shards``, in order. With ``check_digest`` the store loads them
        together (:meth:`Store.load_torch_many`: a local store reads and hashes the files at once);
        the first failure in ``shards`` order is recorded and raised. With ``into``, tensors are
        loaded into its tensors at the same key paths (:mod:`ckptdb.storage.into`)."""
        if not check_digest:
            loaded = [self.load_file(info, directory, s, check_digest=False) for s in shards]
            return loaded if into is None else into_mod.copy_all_into(loaded, into)
        results = self.ctx.store.load_torch_many(
            directory,
            [(s.path, self._expect(info, s)) for s in shards],
            info.step_nr,
            mmap=self.ctx.load_options.mmap,
            into=into,
        )
        for s, r in zip(shards, results, strict=False):
            if isinstance(r, BaseException):
                if isinstance(r, CheckpointCorruptError | UnsafeCheckpointFileError):
                    self._record_failure(info, s, r)
                raise r
        return results

    @staticmethod
    def _expect(info: CheckpointInfo, s: ShardInfo) -> FileRecord:
        return FileRecord(
            s.path, s.size_bytes, s.hash_algorithm, s.digest, checksum=s.remote_checksum, trusted=info.saved_by_ckptdb
        )

    def _load(self, info: CheckpointInfo, directory: str, s: ShardInfo, check_digest: bool) -> Any:
        expect = self._expect(info, s) if check_digest else None
        return self.ctx.store.load_torch(
            directory, s.path, info.step_nr, mmap=self.ctx.load_options.mmap, expect=expect
        )

    def _record_failure(
        self, info: CheckpointInfo, s: ShardInfo, e: CheckpointCorruptError | UnsafeCheckpointFileError
    ) -> None:
        if isinstance(e, CheckpointCorruptError):
            self.mark_damaged(info, e)
        else:  # a file swapped for a hostile pickle: damage too
            self.mark_damaged(info, CheckpointCorruptError(info.step_nr, s.path, "a weights-only torch file", str(e)))

    def load_checkpoint(
        self, step_nr: int, verify: str, sharded_state: dict[str, Any] | None, into: Any = None
    ) -> dict[str, Any]:
        info, shards = self.ctx.on_coordinator(lambda: self.committed(step_nr), "load_checkpoint")
        return self.load_state(info, shards, verify, sharded_state, into)

    def load_sharded_state(self, step_nr: int, state_dict: dict[str, Any], verify: str) -> None:
        info, shards = self.ctx.on_coordinator(lambda: self.committed(step_nr), "load_sharded_state")
        self.load_sharded(info, shards, state_dict, verify)

    def load_sharded(
        self, info: CheckpointInfo, shards: list[ShardInfo], state_dict: dict[str, Any], verify: str
    ) -> None:
        ctx = self.ctx
        prefix = SHARDED_DIR + "/"
        records = {
            s.path: FileRecord(s.path, s.size_bytes, s.hash_algorithm, s.digest, s.rank, s.kind, s.remote_checksum)
            for s in shards
            if s.path.startswith(prefix)
        }
        if not records:
            raise CheckpointNotFoundError(f"step {info.step_nr} has no sharded state", step_nr=info.step_nr)

        def load() -> None:
            ctx.store.load_sharded(
                ctx.store.check_directory(info.step_nr, info.directory),
                state_dict,
                records,
                info.step_nr,
                process_group=process_group_of(ctx.gang),
                verify=verify,
            )

        try:
            run_on_all(ctx.gang, load, "load_sharded_state")
        except CheckpointCorruptError as e:
            self.mark_damaged(info, e)
            raise

    def load_state(
        self,
        info: CheckpointInfo,
        shards: list[ShardInfo],
        verify: str,
        sharded_state: dict[str, Any] | None = None,
        into: Any = None,
    ) -> dict[str, Any]:
        """This rank's state of ``info`` (its rank file, the replicated and the model file merged);
        with ``into``, loaded into its tensors where it has them (:mod:`ckptdb.storage.into`)."""
        ctx = self.ctx
        tp_rank, tp_size = ctx.sfx
        wanted = [layout.rank_file(ctx.dp_gang.rank, tp_rank, tp_size), layout.replicated_file(tp_rank, tp_size)]
        by_path = {s.path: s for s in shards}
        mine = [by_path[p] for p in wanted if p in by_path]
        model = by_path.get(layout.model_file(tp_rank, tp_size))

        def load() -> dict[str, Any]:
            for s in shards:  # a file list naming a path outside the step directory is a corrupt row
                layout.check_relpath(s.path, info.step_nr)
            on_load = self.digest_on_load(verify)
            self.verify_and_mark(info, [*mine, *([model] if model else [])], "size" if on_load else verify)
            directory = ctx.store.check_directory(info.step_nr, info.directory)
            state: dict[str, Any] = {}
            parts = self.load_files(
                info, directory, [*mine, *([model] if model else [])], check_digest=on_load, into=into
            )
            for s, part in zip(mine, parts, strict=False):
                if not isinstance(part, dict):
                    raise CheckpointCorruptError(info.step_nr, s.path, "a dict", type(part).__name__)
                state.update(part)
            if model is not None:
                part = parts[-1]
                key = part.get("model_key", "model") if isinstance(part, dict) else "model"
                if key not in state and isinstance(part, dict) and key in part:
                    state[key] = part[key]
            state.pop(MODEL_KEY_ENTRY, None)  # fairseq2's FSDP rank files carry it; fairseq2's loader drops it
            if not state and sharded_state is None:
                hint = ""
                if any(s.path.startswith(SHARDED_DIR + "/") for s in shards):
                    hint = " outside its sharded part (load that with sharded_state= or load_sharded_state())"
                raise CheckpointNotFoundError(
                    f"step {info.step_nr} has no state for this rank{hint}", step_nr=info.step_nr
                )
            return state

        try:
            state = run_on_all(ctx.gang, load, "load_checkpoint")
        except CheckpointCorruptError as e:  # found on any rank: the coordinator records it
            self.mark_damaged(info, e)
            raise
        if sharded_state is not None:
            self.load_sharded(info, shards, sharded_state, verify)
            state.update(sharded_state)
        return state

    def load_last_checkpoint(
        self, verify: str, sharded_state: dict[str, Any] | None, into: Any = None
    ) -> tuple[int, dict[str, Any]]:
        """The newest committed checkpoint; a damaged one is skipped (warning; recorded) unless
        ``LoadOptions(fallback=False)``."""
        ctx = self.ctx
        below: int | None = None
        while True:

            def newest(below: int | None = below) -> tuple[CheckpointInfo, list[ShardInfo]] | None:
                c = ctx.catalog.newest_committed(ctx.run.id, below=below)
                return None if c is None else (c, ctx.catalog.shards(c.id))

            found = ctx.on_coordinator(newest, "load_last_checkpoint")
            if found is None:
                hint = ""
                foreign = ctx.last_recovery.foreign if ctx.last_recovery else []
                if foreign and below is None:
                    hint = (
                        f"; {len(foreign)} step directories here are not in the catalog "
                        f"({', '.join(sorted(foreign)[:3])}...): adopt them with `ckptdb import`"
                    )
                raise CheckpointNotFoundError(
                    f"run {ctx.run_name!r} has no committed checkpoint"
                    + ("" if below is None else f" below step {below} that is intact")
                    + hint
                )
            info, shards = found
            try:
                return info.step_nr, self.load_state(info, shards, verify, sharded_state, into)
            except (CheckpointCorruptError, UnsafeCheckpointFileError) as e:
                if not ctx.load_options.fallback:
                    raise
                log.warning("ckptdb: step %d is damaged (%s); falling back to an older checkpoint", info.step_nr, e)
                below = info.step_nr

    def load_metadata(self, step_nr: int) -> dict[str, Any] | None:
        ctx = self.ctx
        info, shards = ctx.on_coordinator(lambda: self.committed(step_nr), "load_metadata")
        s = next((x for x in shards if x.path == layout.metadata_file(*ctx.sfx)), None)
        if s is None:
            return None
        on_load = self.digest_on_load(ctx.load_options.verify)
        self.verify_and_mark(info, [s], "size" if on_load else ctx.load_options.verify)
        result = self.load_file(info, ctx.store.check_directory(info.step_nr, info.directory), s, check_digest=on_load)
        return dict(result) if isinstance(result, Mapping) else None


__all__ = ["MODEL_KEY_ENTRY", "Loader", "mark_damaged"]

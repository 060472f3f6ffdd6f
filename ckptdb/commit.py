"""The commit protocol of a manager: begin, write, commit (publish + one catalog transaction), abort.

Call order for one checkpoint (every crash window is in docs/architecture.md; with several ranks,
who does what and what a failure does is in docs/distributed.md)::

    begin(step)          rank 0: check step_<N> is free, catalog row 'pending' (token T),
                         store.open_writer(step, T).open(create=True)          hooks save.after_begin,
                                                                                     save.after_mkdir
    save_state / save_metadata / save_consolidated_fsdp_model
                         every rank: write + hash its files into the attempt   hook save.after_write
    commit()             write staged files (async saves) and score.txt, gather every rank's records;
                         rank 0: writer.finalize() (fsync)                     hook commit.before_lock
                         under the run's lock: row still pending? store.publish(),
                         catalog.commit(files, scores)                         hooks commit.locked,
                                                                                     commit.after_publish,
                                                                                     commit.before_unlock
                         after the lock: remove the superseded copy            hooks commit.after_unlock,
                                                                                     commit.after_remove_old
    | abort()            writer.abort(), row 'aborted'

A failure on any rank rolls the attempt back everywhere (:meth:`Committer.fail`); a catalog commit
that fails after the publish is undone (:meth:`Committer.undo_publish`) unless the COMMIT reached
the catalog. The payload is only touched through the run's :class:`~ckptdb.storage.store.Store`:
on a local store the publish is the rename of ``step_<N>.tmp-<T>`` to ``step_<N>``; on an object
store it is nothing (the catalog flip is the commit).

Asynchronous saves (one process; ``SaveOptions(blocking=False)``): ``save_state`` copies the state
into reused host staging buffers; :meth:`Committer.commit_checkpoint` hands :meth:`Committer.commit`
to a background thread (:mod:`ckptdb.asyncsave`).
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import time
from collections.abc import Callable, Mapping, Set
from typing import Any

import torch

from ckptdb import _hooks, validation
from ckptdb.asyncsave import BackgroundCommitter
from ckptdb.catalog import CheckpointInfo, SaveTimings, ShardInfo
from ckptdb.catalog.models import State
from ckptdb.context import RunContext
from ckptdb.distributed import RankLostError, agree, collective, process_group_of, run_on_all
from ckptdb.errors import CheckpointError, CheckpointExistsError, InvalidArgumentError, InvalidOperationError
from ckptdb.load import MODEL_KEY_ENTRY
from ckptdb.recovery import hold_token, release_token
from ckptdb.storage import layout
from ckptdb.storage.safety import check_weights_only_safe
from ckptdb.storage.staging import StagingArea
from ckptdb.storage.store import AttemptWriter, Published
from ckptdb.storage.writer import FileRecord, TorchFile

log = logging.getLogger("ckptdb")

HEARTBEAT_EVERY_S = 60.0


def jsonable(value: Any) -> Any:
    """A JSON rendering of a metadata mapping for the catalog (tensors summarised, objects repr'd)."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        if value.numel() == 1:
            return value.item()
        return {"tensor": {"shape": list(value.shape), "dtype": str(value.dtype)}}
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return repr(value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return repr(value)


@dataclasses.dataclass
class OpenCheckpoint:
    """The checkpoint being written by this manager."""

    info: CheckpointInfo | None  # None on non-coordinator ranks
    step_nr: int
    token: str
    writer: AttemptWriter
    scores: dict[str, float] = dataclasses.field(default_factory=dict)
    user_metadata: dict[str, Any] | None = None
    state_saved: bool = False
    staged: list[TorchFile] = dataclasses.field(default_factory=list)  # asynchronous saves: written at commit
    stage_seconds: float = 0.0
    last_beat: float = dataclasses.field(default_factory=time.monotonic)  # begin wrote the first heartbeat
    # asynchronous saves: the row and the directory are not made yet (``Committer.begun`` makes them,
    # in the background commit or before a write that needs the directory); the begin's overwrite flag
    deferred: bool | None = None


class Committer:
    """Begins, writes, commits and aborts this manager's checkpoints (see the module docstring).

    ``after_commit(step_nr)`` runs on every rank after each successful commit (the facade applies
    its retention policy there).
    """

    def __init__(self, ctx: RunContext, after_commit: Callable[[int], None]) -> None:
        self.ctx = ctx
        self.after_commit = after_commit
        self.open: OpenCheckpoint | None = None
        self.background = BackgroundCommitter()
        self.staging = StagingArea()

    # -- begin ----------------------------------------------------------------------------------

    def require_open(self, *, begun: bool = True) -> OpenCheckpoint:
        """The open checkpoint; with ``begun``, its row and directory made first (a deferred begin)."""
        if self.open is None:
            raise InvalidOperationError("`begin_checkpoint()` must be called first.")
        op = self.open
        if begun and op.deferred is not None:
            self.begun(op)
        return op

    def writer(self, step_nr: int, token: str) -> AttemptWriter:
        opts = self.ctx.save_options
        return self.ctx.store.open_writer(
            step_nr, token, hash_algorithm=opts.hash_algorithm, parallel=opts.parallel_files
        )

    def begin(self, step_nr: int, overwrite: bool) -> None:
        """A 'pending' catalog row, then the attempt's directory (``step_nr`` already validated).

        An asynchronous save (``SaveOptions(blocking=False)``, one process) only checks here what the
        row's insert would refuse (the step's directory, then one catalog read): the row and the
        directory are made by the background commit, before its first write (:meth:`begun`), so the
        save's stall holds no catalog transaction and no fsync. Until then nothing of the attempt
        exists, in the catalog or on disk; a writer that began the same step in between makes that
        commit fail (its error is raised by the next call, as for any background failure).
        """
        ctx = self.ctx
        if not ctx.save_options.blocking and ctx.gang.size == 1:
            self.check_step_dir_free(step_nr, overwrite)
            ctx.catalog.check_begin(ctx.run.id, step_nr, overwrite=overwrite)
            token = secrets.token_hex(8)
            self.open = OpenCheckpoint(None, step_nr, token, self.writer(step_nr, token), deferred=overwrite)
            return

        def coordinator() -> tuple[CheckpointInfo, str]:
            self.check_step_dir_free(step_nr, overwrite)
            token = secrets.token_hex(8)
            writer = self.writer(step_nr, token)
            info = self.make_attempt(step_nr, overwrite, token, writer)
            begun.append((info, token))
            return info, token

        begun: list[tuple[CheckpointInfo, str]] = []
        try:
            info, token = ctx.on_coordinator(coordinator, "begin_checkpoint")
        except RankLostError:
            if begun:  # the coordinator began it, then lost a peer: roll it back here and now
                self.rollback(
                    OpenCheckpoint(begun[0][0], step_nr, begun[0][1], self.writer(step_nr, begun[0][1])), "rank lost"
                )
            raise
        self.open = OpenCheckpoint(
            info if ctx.is_coordinator else None, step_nr, info.token, self.writer(step_nr, token)
        )

    def make_attempt(self, step_nr: int, overwrite: bool, token: str, writer: AttemptWriter) -> CheckpointInfo:
        """The pending row (token ``token``), then the attempt's directory; the row is aborted if the
        directory cannot be made."""
        ctx = self.ctx
        info = ctx.catalog.begin(
            ctx.run.id,
            step_nr,
            token,
            ctx.store.committed_dir(step_nr, token),
            ctx.writer_info(),
            hash_algorithm=ctx.save_options.hash_algorithm,
            overwrite=overwrite,
        )
        hold_token(token, self)
        _hooks.hook("save.after_begin")
        try:
            writer.open(create=True)
        except OSError as e:
            ctx.catalog.abort(info.id, f"could not create the step directory: {e}", ctx.who)
            release_token(token)
            raise CheckpointError(f"step {step_nr}: cannot create {writer.where!r}: {e}; nothing was saved") from e
        _hooks.hook("save.after_mkdir")
        return info

    def begun(self, op: OpenCheckpoint) -> None:
        """Make a deferred begin's row and directory (one process). If that fails, the checkpoint is
        closed (nothing of it exists) and the error raised."""
        if op.deferred is None:
            return
        self.check_step_dir_free(op.step_nr, op.deferred)  # again: time has passed since begin_checkpoint
        try:
            op.info = self.make_attempt(op.step_nr, op.deferred, op.token, op.writer)
        except BaseException:
            if self.open is op:
                self.open = None
            raise
        op.deferred = None
        op.last_beat = time.monotonic()

    def check_step_dir_free(self, step_nr: int, overwrite: bool) -> None:
        """Refuse a ``step_<N>`` in the store that the catalog cannot account for."""
        ctx = self.ctx
        final = layout.step_dir_name(step_nr)
        if not ctx.store.exists(final):
            return
        where = ctx.store.describe(final)
        owner = ctx.store.owner(final)
        live = ctx.catalog.live(ctx.run.id, step_nr)
        # saving a damaged step again needs no overwrite=True: step_N must then be the damaged copy
        resave = not overwrite and live is not None and live.state in (State.CORRUPT.value, State.MISSING.value)
        if owner is not None and owner in ctx.catalog.by_tokens([owner]):
            if resave and live is not None and owner != live.token:
                raise CheckpointExistsError(
                    f"{where!r} belongs to another catalog row (token {owner}), not to step {step_nr}'s "
                    f"{live.state} checkpoint; move it away or pass overwrite=True to replace it",
                    step_nr=step_nr,
                )
            return  # ours: the catalog decides (CheckpointExistsError unless overwrite or damaged)
        if live is not None and owner is None:
            if resave and live.state == State.MISSING.value:
                # the catalog's copy went missing and a directory without a token stands in its place:
                # it may be anyone's (ckptdb never deletes files it did not write)
                raise CheckpointExistsError(
                    f"{where!r} has no .ckptdb_token and step {step_nr}'s checkpoint is missing: it may "
                    f"not be the catalog's copy; move it away, or pass overwrite=True to replace it",
                    step_nr=step_nr,
                )
            return  # an adopted (imported) directory
        raise CheckpointExistsError(
            f"{where!r} exists but the catalog has no checkpoint for it; adopt it with "
            f"`ckptdb import` or move it away (ckptdb never deletes files it did not write)",
            step_nr=step_nr,
        )

    # -- failure and rollback -------------------------------------------------------------------

    def fail(self, op: OpenCheckpoint, what: str, exc: BaseException) -> CheckpointError:
        """A save step failed on some rank: roll the checkpoint back everywhere."""
        gone = self.rolled_back_elsewhere(op)
        self.rollback(op, f"{what} failed: {exc}")
        if gone is not None and "rolled back by another process" not in str(exc):
            # e.g. a writer frozen past RecoveryOptions.stale_after whose temporary directory another
            # host's recovery removed: say so, not just the ENOENT that followed
            return CheckpointError(
                f"step {op.step_nr}: the pending checkpoint was rolled back by another process ({gone}) "
                f"while this writer was away; {what} then failed ({exc}); nothing was published, "
                "earlier checkpoints are intact"
            )
        if isinstance(exc, CheckpointError):
            return exc
        return CheckpointError(
            f"step {op.step_nr}: {what} failed ({exc}); the pending checkpoint was rolled back, "
            "earlier checkpoints are intact"
        )

    def rolled_back_elsewhere(self, op: OpenCheckpoint) -> str | None:
        """The row's state when another process moved it on (no longer ``pending``), else None."""
        if not self.ctx.is_coordinator or op.info is None:
            return None
        try:
            row = self.ctx.catalog.by_tokens([op.token]).get(op.token)
        except CheckpointError:  # catalog unreachable: nothing more to say
            return None
        if row is None:
            return "its row is gone"
        return None if row.state == State.PENDING.value else f"now {row.state}"

    def rollback(self, op: OpenCheckpoint, reason: str) -> None:
        self.open = None
        if self.ctx.is_coordinator and op.info is not None:
            op.writer.abort()
            try:
                self.ctx.catalog.abort(op.info.id, reason, self.ctx.who)
            except CheckpointError as e:  # catalog down: the next open rolls it back
                log.warning("ckptdb: could not record the rollback of step %d: %s", op.step_nr, e)
            release_token(op.token)

    def write_all(self, op: OpenCheckpoint, what: str, fn: Callable[[], None]) -> None:
        """Run ``fn`` on every rank; a failure anywhere rolls the checkpoint back and raises everywhere."""
        try:
            run_on_all(self.ctx.gang, fn, what)
        except Exception as e:
            raise self.fail(op, what, e) from e

    # -- writing --------------------------------------------------------------------------------

    def save_state(self, state: Mapping[str, Any], model_key: str, replicated_keys: Set[str]) -> None:
        """fairseq2's layout: ``model.pt``, ``replicated.pt``, ``rank_<dp>.pt``; sharded values via DCP."""
        ctx = self.ctx
        op = self.require_open(begun=False)  # staged in memory: the row can wait (asynchronous saves)
        tp_rank, tp_size = ctx.sfx
        dp_rank, dp_size = ctx.dp_gang.rank, ctx.dp_gang.size
        if op.state_saved:  # the same answer on every rank: no rank is left in a collective
            raise InvalidOperationError(
                f"save_state() was already called for step {op.step_nr}: pass the whole state to one "
                "save_state() call (a second call would replace the first one's files)"
            )

        def check() -> list[str]:
            if not isinstance(state, Mapping):
                raise InvalidArgumentError(f"state must be a mapping, not {type(state).__name__}")
            if MODEL_KEY_ENTRY in state:  # fairseq2's loader drops it, so it would never load back
                raise InvalidArgumentError(
                    f"state[{MODEL_KEY_ENTRY!r}]: the key {MODEL_KEY_ENTRY!r} is reserved (fairseq2 records the "
                    "model's key under it and drops it on load); rename it"
                )
            # one walk: refuses what a weights-only load would refuse (DCP pickles the non-tensor values
            # too) and finds the keys whose values hold sharded tensors
            return check_weights_only_safe(state, allow_sharded=True)

        # a refusal on any rank is raised on every rank; nothing is written and the checkpoint stays open
        try:
            sharded = run_on_all(ctx.gang, check, "save_state")
            agree(ctx.gang, sharded, "save_state: keys with sharded values")
        except RankLostError as e:
            raise self.fail(op, "save_state", e) from e

        def write() -> None:
            rest = {k: v for k, v in state.items() if k not in sharded}
            files: list[TorchFile] = []
            if model_key in rest and (dp_size == 1 or model_key in replicated_keys or "*" in replicated_keys):
                model = rest.pop(model_key)
                if dp_rank == 0:
                    files.append(
                        TorchFile(
                            layout.model_file(tp_rank, tp_size),
                            {model_key: model, "model_key": model_key},
                            ctx.gang.rank,
                            "model",
                        )
                    )
            if replicated_keys:
                keys = set(rest) if "*" in replicated_keys else replicated_keys & set(rest)
                replicated = {k: rest.pop(k) for k in sorted(keys)}
                if dp_rank == 0 and replicated:
                    files.append(
                        TorchFile(layout.replicated_file(tp_rank, tp_size), replicated, ctx.gang.rank, "replicated")
                    )
            if rest:
                files.append(TorchFile(layout.rank_file(dp_rank, tp_rank, tp_size), rest, ctx.gang.rank, "rank"))
            if ctx.save_options.blocking:
                op.writer.write_torch_many(files)
            else:  # asynchronous: copy now, write at commit (in the background)
                self.staging.reset_stats()
                op.staged.extend(dataclasses.replace(f, obj=self.staging.stage(f.relpath, f.obj)) for f in files)
                op.stage_seconds += self.staging.seconds

        op.state_saved = True
        self.write_all(op, "save_state", write)
        if sharded:
            self.begun(op)
            self.write_all(op, "save_state (sharded)", lambda: self.save_sharded(op, {k: state[k] for k in sharded}))
        _hooks.hook("save.after_write")
        self.heartbeat(op)

    def save_sharded(self, op: OpenCheckpoint, state: dict[str, Any]) -> None:
        op.writer.write_sharded(state, rank=self.ctx.gang.rank, process_group=process_group_of(self.ctx.gang))

    def save_consolidated_fsdp_model(self, model: torch.nn.Module, model_key: str) -> None:
        ctx = self.ctx
        op = self.require_open()

        def write() -> None:
            from ckptdb.storage.dcp import full_model_state_dict  # imports DCP (0.4-0.8 s): only here

            sd = full_model_state_dict(model)
            if ctx.dp_gang.rank == 0:
                op.writer.write_torch(
                    layout.model_file(*ctx.sfx),
                    {model_key: sd, "model_key": model_key},
                    rank=ctx.gang.rank,
                    kind="model",
                )

        self.write_all(op, "save_consolidated_fsdp_model", write)

    def save_metadata(self, metadata: Mapping[str, Any]) -> None:
        ctx = self.ctx
        op = self.require_open()

        def check() -> None:
            if not isinstance(metadata, Mapping):
                raise InvalidArgumentError(f"metadata must be a mapping, not {type(metadata).__name__}")
            for k in metadata:
                validation.name(k, "metadata key")
            check_weights_only_safe(metadata, root="metadata")

        try:
            run_on_all(ctx.gang, check, "save_metadata")  # a refusal reaches every rank; nothing written
        except RankLostError as e:
            raise self.fail(op, "save_metadata", e) from e
        data = dict(metadata)
        op.user_metadata = jsonable(data)

        def write() -> None:
            if ctx.dp_gang.rank == 0:
                op.writer.write_torch(layout.metadata_file(*ctx.sfx), data, rank=ctx.gang.rank, kind="metadata")

        self.write_all(op, "save_metadata", write)
        self.heartbeat(op)

    def save_score(self, score: float | None, metric: str) -> None:
        op = self.require_open(begun=False)
        if score is None:
            return
        op.scores[validation.name(metric, "metric")] = validation.score(score)

    def heartbeat(self, op: OpenCheckpoint) -> None:
        # At most one heartbeat transaction a minute: it only has to beat RecoveryOptions.stale_after
        # (hours), and each one is a synchronous catalog write on the save's critical path. It is
        # what keeps a writer that others cannot check by pid (another host, another container on
        # this host) alive in their eyes: written by begin, save_state, save_metadata and commit.
        if time.monotonic() - op.last_beat < HEARTBEAT_EVERY_S:
            return
        op.last_beat = time.monotonic()
        if self.ctx.is_coordinator and op.info is not None:
            try:
                self.ctx.catalog.heartbeat(op.info.id)
            except CheckpointError as e:
                log.warning("ckptdb: heartbeat failed: %s", e)

    # -- commit ---------------------------------------------------------------------------------

    def commit_checkpoint(self, blocking: bool) -> None:
        op = self.require_open(begun=False)  # commit() makes a deferred begin's row first
        if blocking:
            self.commit(op)
            return
        if self.ctx.gang.size > 1:
            raise InvalidOperationError("commit_checkpoint(blocking=False) is single-process only")
        self.open = None  # the background thread owns it now; begin_checkpoint waits for it
        self.background.submit(op.step_nr, lambda: self.commit(op))

    def wait(self, timeout: float | None = None) -> bool:
        return self.background.wait(timeout)

    def commit(self, op: OpenCheckpoint) -> None:
        ctx = self.ctx
        store = ctx.store
        _hooks.hook("commit.start")
        self.begun(op)  # an asynchronous save's row and directory, before its first write
        self.heartbeat(op)  # the staged writes and fsyncs below may take long: start them with a fresh beat
        if op.staged:
            staged, op.staged = op.staged, []

            def write_staged() -> None:
                op.writer.write_torch_many(staged)

            self.write_all(op, "commit_checkpoint", write_staged)
        commit_started = time.perf_counter()

        def write_score() -> None:
            if ctx.is_coordinator and "score" in op.scores:
                op.writer.write_bytes(layout.SCORE_FILE, f"{op.scores['score']}\n".encode(), kind="score")

        self.write_all(op, "commit_checkpoint", write_score)
        # every rank's (path, size, digest) to the coordinator; a lost rank rolls back everywhere
        try:
            records: list[list[FileRecord]] = collective(
                ctx.gang, lambda: ctx.gang.all_gather_object(list(op.writer.records.values())), "commit_checkpoint"
            )
        except RankLostError as e:
            raise self.fail(op, "commit_checkpoint", e) from e

        def coordinator() -> CheckpointInfo:
            assert op.info is not None
            files: dict[str, ShardInfo] = {}
            for recs in records:
                for r in recs:
                    files[r.path] = ShardInfo(
                        r.path, r.size_bytes, r.hash_algorithm, r.digest, r.rank, r.kind, remote_checksum=r.checksum
                    )
            try:
                op.writer.finalize()
            except OSError as e:
                raise self.fail(op, "commit_checkpoint", e) from e
            _hooks.hook("commit.before_lock")
            timings = SaveTimings(op.stage_seconds, op.writer.write_seconds, op.writer.sync_seconds, commit_started)
            published: Published | None = None  # None: not published
            publishing = False
            try:
                # publish + catalog commit under the run's lock: recovery, gc and delete re-check rows
                # under the same lock, so none acts between the publish and the commit
                with ctx.catalog.run_lock(ctx.run.id):
                    row = ctx.catalog.by_tokens([op.token]).get(op.token)
                    if row is None or row.state != State.PENDING.value:
                        publishing = True  # (its own message, below)
                        raise CheckpointError(
                            f"step {op.step_nr}: the pending checkpoint was rolled back by another process "
                            f"({row.state if row else 'row gone'}); nothing was published, "
                            "earlier checkpoints are intact"
                        )
                    publishing = True
                    _hooks.hook("commit.locked")
                    published = store.publish(op.step_nr, op.token, previous=self.previous_dir(op))
                    _hooks.hook("commit.after_publish")
                    info = ctx.catalog.commit(
                        op.info.id, files.values(), op.scores, op.user_metadata, ctx.who, timings=timings
                    )
                    _hooks.hook("commit.before_unlock")
            except CheckpointError as e:
                if published is None and publishing:
                    raise self.fail(op, "commit_checkpoint", e) from e  # publish put back what it had moved
                if published is None:  # the catalog failed before anything was published
                    err = CheckpointError(
                        f"step {op.step_nr}: the catalog commit failed ({e}); the checkpoint was not committed "
                        "and earlier checkpoints are intact"
                    )
                    raise self.fail(op, "commit_checkpoint", err) from e
                committed = self.undo_publish(op, published)
                if committed is None:
                    raise CheckpointError(
                        f"step {op.step_nr}: the catalog commit failed ({e}); the checkpoint was not committed "
                        "and earlier checkpoints are intact"
                    ) from e
                info = committed  # the COMMIT reached the catalog although the call failed
            _hooks.hook("commit.after_unlock")
            if published is not None and published.superseded is not None:
                try:
                    store.remove_tree(published.superseded)
                except OSError as e:  # the commit stands; recovery removes the superseded copy
                    log.warning("ckptdb: could not remove the superseded copy of step %d: %s", op.step_nr, e)
            _hooks.hook("commit.after_remove_old")
            return info

        try:
            ctx.on_coordinator(coordinator, "commit_checkpoint")
        finally:
            self.open = None
            release_token(op.token)
        self.after_commit(op.step_nr)

    def previous_dir(self, op: OpenCheckpoint) -> str | None:
        """The directory of the copy this commit replaces, for a store that keeps each attempt where it was
        written (object store: removed after the commit). A local store renames ``step_<N>`` aside itself."""
        if self.ctx.store.is_local:
            return None
        live = self.ctx.catalog.live(self.ctx.run.id, op.step_nr)
        return None if live is None or live.token == op.token else live.directory

    def undo_publish(self, op: OpenCheckpoint, published: Published) -> CheckpointInfo | None:
        """The catalog commit failed after the publish: put the directories back if the row is not committed.

        Returns the row when it turns out committed (the COMMIT reached the catalog); None when the
        publish was undone (or left to recovery: catalog unreachable). Raises CheckpointError saying
        where the committed copy is when a rename back fails.
        """
        ctx = self.ctx
        try:
            with ctx.catalog.run_lock(ctx.run.id):  # decided and undone with no commit/recovery in between
                row = ctx.catalog.by_tokens([op.token]).get(op.token)
                if row is not None and row.state == State.COMMITTED.value:
                    return row
                ctx.store.unpublish(op.step_nr, op.token, published)
                if row is not None and row.state == State.PENDING.value:
                    ctx.catalog.abort(row.id, "catalog commit failed", ctx.who)
        except CheckpointError as e:  # catalog unreachable: the next open's recovery decides from the row
            log.warning("ckptdb: step %d: could not undo the publish (%s); recovery will", op.step_nr, e)
            return None
        except OSError as e:
            raise CheckpointError(
                f"step {op.step_nr}: the catalog commit failed and putting the directories back failed ({e}); "
                + ctx.store.whereabouts(op.step_nr, op.token, published)
            ) from e
        op.writer.abort()  # the new copy, back at its temporary name
        return None

    def abort_checkpoint(self) -> None:
        op = self.require_open(begun=False)  # a deferred begin made nothing: nothing to undo
        try:
            if self.ctx.gang.size > 1:
                collective(self.ctx.gang, self.ctx.gang.barrier, "abort_checkpoint")
        finally:
            self.rollback(op, "abort_checkpoint")


__all__ = ["HEARTBEAT_EVERY_S", "Committer", "OpenCheckpoint", "jsonable"]

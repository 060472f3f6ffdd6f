"""FileCheckpointManager: fairseq2's checkpoint API over a transactional SQL catalog.

Call order for one checkpoint (the commit protocol, with every crash window, is in
docs/architecture.md; with several ranks, who does what and what a failure does is in
docs/distributed.md)::

    begin_checkpoint(step_nr)      catalog: insert row 'pending'        disk: mkdir step_N.tmp-<token>/
    save_state(state)                                                   disk: write + hash + fsync files
    save_metadata(mapping)?                                             disk: metadata.pt
    save_score(value, metric=)?    (kept in memory until the commit)
    commit_checkpoint()                                                 disk: fsync, rename to step_N/
                                   catalog: 'pending' -> 'committed' with every file's size and digest
      | abort_checkpoint()         catalog: 'pending' -> 'aborted'      disk: remove step_N.tmp-<token>/

Asynchronous saves (one process; ``SaveOptions(blocking=False)``): ``save_state`` copies the
state into reused host staging buffers instead of writing it, ``commit_checkpoint()`` returns at
once and a background thread writes, hashes, fsyncs, renames and commits the catalog row
(:mod:`ckptdb.asyncsave`). The next manager call waits for it and raises its error, if any;
``wait()`` does so explicitly. Training may change its tensors as soon as ``save_state`` returns.

Example:
    >>> manager = FileCheckpointManager(checkpoint_dir=Path("checkpoints"))
    >>> manager.begin_checkpoint(step_nr=1000)
    >>> manager.save_state({"model": model.state_dict(), "optimizer": opt.state_dict(), "step_nr": 1000})
    >>> manager.save_score(valid_loss)
    >>> manager.commit_checkpoint()
    >>> step_nr, state = manager.load_last_checkpoint()
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import secrets
import time
from collections.abc import Callable, Mapping, Set
from pathlib import Path
from typing import Any, TypeVar

import torch
import yaml

from ckptdb import __version__, _hooks, _proc, validation
from ckptdb.asyncsave import BackgroundCommitter
from ckptdb.catalog import Catalog, CheckpointInfo, RunInfo, SaveTimings, ShardInfo, WriterInfo
from ckptdb.catalog.models import State
from ckptdb.catalog.session import masked, sqlite_url
from ckptdb.distributed import (
    Gang,
    LocalGang,
    RankLostError,
    agree,
    as_gang,
    collective,
    process_group_of,
    run_on_all,
    run_on_coordinator,
)
from ckptdb.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    InvalidArgumentError,
    InvalidOperationError,
    UnsafeCheckpointFileError,
)
from ckptdb.options import LoadOptions, RecoveryOptions, SaveOptions
from ckptdb.recovery import (
    RecoveryReport,
    finish_delete,
    hold_token,
    read_owner,
    recover_run,
    release_token,
    set_aside_copy,
)
from ckptdb.storage import dcp as sharded_io
from ckptdb.storage import layout
from ckptdb.storage.hashing import new_hasher
from ckptdb.storage.location import LocalLocation, ObjectLocation, parse_location, require_shared_catalog
from ckptdb.storage.reader import check_files, load_torch
from ckptdb.storage.safety import check_weights_only_safe
from ckptdb.storage.staging import StagingArea
from ckptdb.storage.store import Store, open_store
from ckptdb.storage.writer import (
    FileRecord,
    StepWriter,
    TorchFile,
    committed_copy_whereabouts,
    publish,
    remove_tree,
    unpublish,
    write_text_atomic,
)
from ckptdb.verify import directory_unavailable

log = logging.getLogger("ckptdb")
T = TypeVar("T")

_NOT_STATE_FILES = {layout.SCORE_FILE, layout.TOKEN_FILE}
_MODEL_KEY_ENTRY = "model_key"  # fairseq2's bookkeeping entry in model.pt / rank files, never user state
_HEARTBEAT_EVERY_S = 60.0


def default_run_name(checkpoint_dir: Path | str) -> str:
    """A run is named after its checkpoint directory's absolute path or URL (unique on a shared catalog)."""
    name = str(checkpoint_dir)
    return name if len(name) <= validation.MAX_NAME else "…" + name[-(validation.MAX_NAME - 1) :]


def _jsonable(value: Any) -> Any:
    """A JSON rendering of a metadata mapping for the catalog (tensors summarised, objects repr'd)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
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
class _Open:
    """The checkpoint being written by this manager."""

    info: CheckpointInfo | None  # None on non-coordinator ranks
    step_nr: int
    token: str
    writer: StepWriter
    scores: dict[str, float] = dataclasses.field(default_factory=dict)
    user_metadata: dict[str, Any] | None = None
    state_saved: bool = False
    staged: list[TorchFile] = dataclasses.field(default_factory=list)  # asynchronous saves: written at commit
    stage_seconds: float = 0.0
    last_beat: float = dataclasses.field(default_factory=time.monotonic)  # begin wrote the first heartbeat


class FileCheckpointManager:
    """Saves and loads training checkpoints in ``checkpoint_dir/step_<N>/`` with a SQL catalog.

    Args:
        checkpoint_dir: where step directories live: a path or ``file:///absolute/path`` (created if
            missing). ``s3://bucket/prefix`` needs ``catalog=`` (or ``CKPTDB_URL``); any other URL
            scheme is refused with InvalidArgumentError (see :mod:`ckptdb.storage.location`).
        catalog: SQLAlchemy URL of the catalog. Default: env ``CKPTDB_URL``, else
            ``sqlite:///<checkpoint_dir>/catalog.db``.
        run: the run's name in the catalog. Default: the absolute path of ``checkpoint_dir``.
        gang: ``None`` (one process), a ``torch.distributed`` ProcessGroup, or a ckptdb gang; the
            only argument besides ``checkpoint_dir`` that may be given by position
            (``FileCheckpointManager(checkpoint_dir, gang)``, as fairseq2 calls it); every other
            one is keyword-only.
        dp_gang, tp_gang: data- and tensor-parallel gangs (fairseq2's per-rank layout); given
            together.
        save_options, load_options, recovery_options: see :mod:`ckptdb.options`.
        retention: a policy from :mod:`ckptdb.retention` (e.g. ``AnyOf(KeepLast(2), KeepBest(3))``)
            applied after every commit, as Orbax's ``max_to_keep`` is. ``None``: keep everything
            (the fairseq2-style ``keep_*`` calls work either way).
    """

    def __init__(
        self,
        checkpoint_dir: Path | str,
        gang: Any = None,
        *,
        catalog: str | None = None,
        run: str | None = None,
        dp_gang: Any = None,
        tp_gang: Any = None,
        save_options: SaveOptions | None = None,
        load_options: LoadOptions | None = None,
        recovery_options: RecoveryOptions | None = None,
        retention: Any = None,
    ) -> None:
        if isinstance(gang, str | os.PathLike):
            raise InvalidArgumentError(
                f"FileCheckpointManager's second positional argument is the gang, not a {type(gang).__name__}: "
                "pass the catalog URL as catalog=..."
            )
        location = parse_location(checkpoint_dir)
        if isinstance(location, ObjectLocation):
            require_shared_catalog(location, catalog or os.environ.get("CKPTDB_URL"))
        self.store: Store = open_store(location, fsync=(save_options or SaveOptions()).fsync)
        assert isinstance(location, LocalLocation)  # open_store refuses the others (for now)
        self.checkpoint_dir = location.path
        self.gang: Gang = as_gang(gang)
        if (dp_gang is None) != (tp_gang is None):
            raise InvalidArgumentError("dp_gang and tp_gang must be given together")
        self.dp_gang: Gang = as_gang(dp_gang) if dp_gang is not None else self.gang
        self.tp_gang: Gang = as_gang(tp_gang) if tp_gang is not None else LocalGang()
        self.save_options = save_options or SaveOptions()
        self.load_options = load_options or LoadOptions()
        self.recovery_options = recovery_options or RecoveryOptions()
        self.retention = retention
        new_hasher(self.save_options.hash_algorithm)  # fail early on an unknown algorithm
        self.url = catalog or os.environ.get("CKPTDB_URL") or sqlite_url(self.checkpoint_dir / layout.CATALOG_FILE)
        self.run_name = validation.name(run if run is not None else default_run_name(self.checkpoint_dir), "run")
        self._who = (_proc.hostname(), os.getpid())
        self._open: _Open | None = None
        self._catalog: Catalog | None = None
        self.last_recovery: RecoveryReport | None = None
        self._background = BackgroundCommitter()
        self._staging = StagingArea()
        if not self.save_options.blocking and self.gang.size > 1:
            raise InvalidArgumentError("SaveOptions(blocking=False): asynchronous saves are single-process only")
        self._run: RunInfo = self._on_coordinator(self._open_catalog, "opening the catalog")

    # -- plumbing -----------------------------------------------------------------------------

    @property
    def is_coordinator(self) -> bool:
        return self.gang.rank == 0

    @property
    def catalog(self) -> Catalog:
        if self._catalog is None:
            raise InvalidOperationError("only the coordinator rank (rank 0) talks to the catalog")
        return self._catalog

    @property
    def run(self) -> RunInfo:
        return self._run

    def _on_coordinator(self, fn: Callable[[], T], what: str) -> T:
        """Run ``fn`` on rank 0 and give every rank its result, or its error (same type everywhere)."""
        return run_on_coordinator(self.gang, fn, what)

    def _open_catalog(self) -> RunInfo:
        if not self.checkpoint_dir.exists():
            try:
                self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise CheckpointError(f"cannot create checkpoint_dir {str(self.checkpoint_dir)!r}: {e}") from e
        if not self.checkpoint_dir.is_dir():
            raise InvalidArgumentError(f"checkpoint_dir {str(self.checkpoint_dir)!r} is not a directory")
        self._catalog = Catalog(self.url)
        run = self._catalog.ensure_run(self.run_name, str(self.checkpoint_dir))
        if self.recovery_options.on_open:
            self.last_recovery = self._recover(run)
        return run

    def _recover(self, run: RunInfo) -> RecoveryReport | None:
        if not os.access(self.checkpoint_dir, os.W_OK):
            log.warning("ckptdb: %s is read-only; skipping recovery (loads still work)", self.checkpoint_dir)
            return None
        try:
            return recover_run(
                self.catalog,
                run,
                self.checkpoint_dir,
                self._who,
                stale_after=self.recovery_options.stale_after,
                fsync=self.save_options.fsync,
            )
        except OSError as e:  # EIO, ENOSPC...: every step of recovery is redone on the next try
            raise CheckpointError(
                f"recovery of run {run.name!r} in {str(self.checkpoint_dir)!r} failed ({e}); nothing committed "
                "was lost; open the manager again (or run `ckptdb gc`) to finish it"
            ) from e

    def recover(self) -> RecoveryReport | None:
        """Roll back dead writers' pending checkpoints and remove debris (done on open)."""
        self.wait()
        return self._on_coordinator(lambda: self._recover(self._run), "recovery")

    def _writer_info(self) -> WriterInfo:
        return WriterInfo(
            host=self._who[0],
            pid=self._who[1],
            start_time=_proc.process_start_time(self._who[1]),
            ckptdb_version=__version__,
            torch_version=torch.__version__,
            python_version=platform.python_version(),
            world_size=self.gang.size,
            boot_id=_proc.boot_id(),
            pid_ns=_proc.pid_namespace(),
        )

    def _require_open(self) -> _Open:
        if self._open is None:
            raise InvalidOperationError("`begin_checkpoint()` must be called first.")
        return self._open

    @property
    def _sfx(self) -> tuple[int, int]:
        return self.tp_gang.rank, self.tp_gang.size

    # -- writing ------------------------------------------------------------------------------

    def begin_checkpoint(self, step_nr: int, *, overwrite: bool = False) -> None:
        """Start checkpoint ``step_nr``: a 'pending' catalog row, then a temporary directory.

        A step whose checkpoint is damaged (``corrupt`` or ``missing``, e.g. after
        ``load_last_checkpoint`` fell back past it) may be saved again without ``overwrite``: the
        commit supersedes the damaged copy, whose files stay in place until then.

        Raises:
            InvalidOperationError: a checkpoint is already open.
            CheckpointExistsError: ``step_nr`` is committed and ``overwrite`` is False.
        """
        if self._open is not None:
            raise InvalidOperationError("`begin_checkpoint()` has already been called.")
        self.wait()
        step_nr = validation.step_nr(step_nr)

        def coordinator() -> tuple[CheckpointInfo, str]:
            self._check_step_dir_free(step_nr, overwrite)
            token = secrets.token_hex(8)
            info = self.catalog.begin(
                self._run.id,
                step_nr,
                token,
                layout.step_dir_name(step_nr),
                self._writer_info(),
                hash_algorithm=self.save_options.hash_algorithm,
                overwrite=overwrite,
            )
            hold_token(token, self)
            _hooks.hook("save.after_begin")
            writer = self._writer(step_nr, token)
            try:
                writer.open(create=True)
            except OSError as e:
                self.catalog.abort(info.id, f"could not create the step directory: {e}", self._who)
                release_token(token)
                raise CheckpointError(
                    f"step {step_nr}: cannot create {str(writer.tmp_dir)!r}: {e}; nothing was saved"
                ) from e
            _hooks.hook("save.after_mkdir")
            begun.append((info, token))
            return info, token

        begun: list[tuple[CheckpointInfo, str]] = []
        try:
            info, token = self._on_coordinator(coordinator, "begin_checkpoint")
        except RankLostError:
            if begun:  # the coordinator began it, then lost a peer: roll it back here and now
                self._rollback(
                    _Open(begun[0][0], step_nr, begun[0][1], self._writer(step_nr, begun[0][1])), "rank lost"
                )
            raise
        self._open = _Open(info if self.is_coordinator else None, step_nr, info.token, self._writer(step_nr, token))

    def _writer(self, step_nr: int, token: str) -> StepWriter:
        return StepWriter(
            self.checkpoint_dir,
            step_nr,
            token,
            hash_algorithm=self.save_options.hash_algorithm,
            fsync=self.save_options.fsync,
            parallel=self.save_options.parallel_files,
        )

    def _check_step_dir_free(self, step_nr: int, overwrite: bool) -> None:
        final = self.checkpoint_dir / layout.step_dir_name(step_nr)
        if not final.exists():
            return
        owner = read_owner(final)
        live = self.catalog.live(self._run.id, step_nr)
        # saving a damaged step again needs no overwrite=True: step_N must then be the damaged copy
        resave = not overwrite and live is not None and live.state in (State.CORRUPT.value, State.MISSING.value)
        if owner is not None and owner in self.catalog.by_tokens([owner]):
            if resave and live is not None and owner != live.token:
                raise CheckpointExistsError(
                    f"{str(final)!r} belongs to another catalog row (token {owner}), not to step {step_nr}'s "
                    f"{live.state} checkpoint; move it away or pass overwrite=True to replace it",
                    step_nr=step_nr,
                )
            return  # ours: the catalog decides (CheckpointExistsError unless overwrite or damaged)
        if live is not None and owner is None:
            if resave and live.state == State.MISSING.value:
                # the catalog's copy went missing and a directory without a token stands in its place:
                # it may be anyone's (ckptdb never deletes files it did not write)
                raise CheckpointExistsError(
                    f"{str(final)!r} has no .ckptdb_token and step {step_nr}'s checkpoint is missing: it may "
                    f"not be the catalog's copy; move it away, or pass overwrite=True to replace it",
                    step_nr=step_nr,
                )
            return  # an adopted (imported) directory
        raise CheckpointExistsError(
            f"{str(final)!r} exists but the catalog has no checkpoint for it; adopt it with "
            f"`ckptdb import` or move it away (ckptdb never deletes files it did not write)",
            step_nr=step_nr,
        )

    def _fail(self, op: _Open, what: str, exc: BaseException) -> CheckpointError:
        """A save step failed on some rank: roll the checkpoint back everywhere."""
        gone = self._rolled_back_elsewhere(op)
        self._rollback(op, f"{what} failed: {exc}")
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

    def _rolled_back_elsewhere(self, op: _Open) -> str | None:
        """The row's state when another process moved it on (no longer ``pending``), else None."""
        if not self.is_coordinator or op.info is None:
            return None
        try:
            row = self.catalog.by_tokens([op.token]).get(op.token)
        except CheckpointError:  # catalog unreachable: nothing more to say
            return None
        if row is None:
            return "its row is gone"
        return None if row.state == State.PENDING.value else f"now {row.state}"

    def _rollback(self, op: _Open, reason: str) -> None:
        self._open = None
        if self.is_coordinator and op.info is not None:
            op.writer.abort()
            try:
                self.catalog.abort(op.info.id, reason, self._who)
            except CheckpointError as e:  # catalog down: the next open rolls it back
                log.warning("ckptdb: could not record the rollback of step %d: %s", op.step_nr, e)
            release_token(op.token)

    def _write_all(self, op: _Open, what: str, fn: Callable[[], None]) -> None:
        try:
            run_on_all(self.gang, fn, what)
        except Exception as e:
            raise self._fail(op, what, e) from e

    def save_state(
        self,
        state: Mapping[str, Any],
        *,
        model_key: str = "model",
        replicated_keys: Set[str] | None = None,
    ) -> None:
        """Write the training state (fairseq2 layout: ``model.pt``, ``replicated.pt``, ``rank_<dp>.pt``).

        Every value must load under ``torch.load(weights_only=True)``; anything else is refused
        here, naming its key, and nothing is written.

        Top-level keys whose values hold sharded tensors (DTensor from FSDP2 ``fully_shard`` or
        tensor parallelism, ShardedTensor) are saved through ``torch.distributed.checkpoint``
        into ``sharded/`` instead (every rank of ``gang`` takes part); load them back with
        :meth:`load_sharded_state`. In a gang, a failure on any rank (refused value, disk error)
        rolls the checkpoint back and raises the same error on every rank.
        """
        op = self._require_open()
        model_key = validation.name(model_key, "model_key")
        replicated_keys = validation.key_set(replicated_keys, "replicated_keys")
        tp_rank, tp_size = self._sfx
        dp_rank, dp_size = self.dp_gang.rank, self.dp_gang.size
        if op.state_saved:  # the same answer on every rank: no rank is left in a collective
            raise InvalidOperationError(
                f"save_state() was already called for step {op.step_nr}: pass the whole state to one "
                "save_state() call (a second call would replace the first one's files)"
            )

        def check() -> list[str]:
            if not isinstance(state, Mapping):
                raise InvalidArgumentError(f"state must be a mapping, not {type(state).__name__}")
            if _MODEL_KEY_ENTRY in state:  # fairseq2's loader drops it, so it would never load back
                raise InvalidArgumentError(
                    f"state[{_MODEL_KEY_ENTRY!r}]: the key {_MODEL_KEY_ENTRY!r} is reserved (fairseq2 records the "
                    "model's key under it and drops it on load); rename it"
                )
            keys = sharded_io.sharded_keys(state)
            check_weights_only_safe(state, allow_sharded=True)  # DCP pickles the non-tensor values too
            return keys

        # a refusal on any rank is raised on every rank; nothing is written and the checkpoint stays open
        try:
            sharded = run_on_all(self.gang, check, "save_state")
            agree(self.gang, sharded, "save_state: keys with sharded values")
        except RankLostError as e:
            raise self._fail(op, "save_state", e) from e

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
                            self.gang.rank,
                            "model",
                        )
                    )
            if replicated_keys:
                keys = set(rest) if "*" in replicated_keys else replicated_keys & set(rest)
                replicated = {k: rest.pop(k) for k in sorted(keys)}
                if dp_rank == 0 and replicated:
                    files.append(
                        TorchFile(layout.replicated_file(tp_rank, tp_size), replicated, self.gang.rank, "replicated")
                    )
            if rest:
                files.append(TorchFile(layout.rank_file(dp_rank, tp_rank, tp_size), rest, self.gang.rank, "rank"))
            if self.save_options.blocking:
                op.writer.write_torch_many(files)
            else:  # asynchronous: copy now, write at commit (in the background)
                self._staging.reset_stats()
                op.staged.extend(dataclasses.replace(f, obj=self._staging.stage(f.relpath, f.obj)) for f in files)
                op.stage_seconds += self._staging.seconds

        op.state_saved = True
        self._write_all(op, "save_state", write)
        if sharded:
            self._write_all(op, "save_state (sharded)", lambda: self._save_sharded(op, {k: state[k] for k in sharded}))
        _hooks.hook("save.after_write")
        self._heartbeat(op)

    def _save_sharded(self, op: _Open, state: dict[str, Any]) -> None:
        records = sharded_io.save_sharded(
            state,
            op.writer.tmp_dir,
            rank=self.gang.rank,
            process_group=process_group_of(self.gang),
            hash_algorithm=self.save_options.hash_algorithm,
            fsync=self.save_options.fsync,
        )
        op.writer.records.update(records)

    def save_consolidated_fsdp_model(self, model: torch.nn.Module, *, model_key: str = "model") -> None:
        """Write the full model state dict as ``model.pt`` (``model.<tp_rank>.pt`` with TP > 1).

        DTensor parameters (FSDP2 ``fully_shard``) are gathered one at a time on every rank of
        their mesh; data-parallel rank 0 writes the file. ``DDP`` / ``torch.compile`` prefixes are
        removed. The result loads later in one process without any process group:
        ``FileCheckpointManager(dir).load_checkpoint(step)["model"]``. Collective.
        """
        op = self._require_open()

        def write() -> None:
            sd = sharded_io.full_model_state_dict(model)
            if self.dp_gang.rank == 0:
                op.writer.write_torch(
                    layout.model_file(*self._sfx),
                    {model_key: sd, "model_key": model_key},
                    rank=self.gang.rank,
                    kind="model",
                )

        self._write_all(op, "save_consolidated_fsdp_model", write)

    def save_metadata(self, metadata: Mapping[str, Any]) -> None:
        """Store a metadata mapping: ``metadata.pt`` in the step and JSON in the catalog."""
        op = self._require_open()

        def check() -> None:
            if not isinstance(metadata, Mapping):
                raise InvalidArgumentError(f"metadata must be a mapping, not {type(metadata).__name__}")
            for k in metadata:
                validation.name(k, "metadata key")
            check_weights_only_safe(metadata, root="metadata")

        try:
            run_on_all(self.gang, check, "save_metadata")  # a refusal reaches every rank; nothing written
        except RankLostError as e:
            raise self._fail(op, "save_metadata", e) from e
        data = dict(metadata)
        op.user_metadata = _jsonable(data)

        def write() -> None:
            if self.dp_gang.rank == 0:
                op.writer.write_torch(layout.metadata_file(*self._sfx), data, rank=self.gang.rank, kind="metadata")

        self._write_all(op, "save_metadata", write)
        self._heartbeat(op)

    def save_score(self, score: float | None, *, metric: str = "score") -> None:
        """Record a score for the open checkpoint (several named metrics allowed).

        ``None`` is ignored (fairseq2's convention). NaN and infinities are stored but never rank
        as "best".
        """
        op = self._require_open()
        if score is None:
            return
        op.scores[validation.name(metric, "metric")] = validation.score(score)

    def _heartbeat(self, op: _Open) -> None:
        # At most one heartbeat transaction a minute: it only has to beat RecoveryOptions.stale_after
        # (hours), and each one is a synchronous catalog write on the save's critical path. It is
        # what keeps a writer that others cannot check by pid (another host, another container on
        # this host) alive in their eyes: written by begin, save_state, save_metadata and commit.
        if time.monotonic() - op.last_beat < _HEARTBEAT_EVERY_S:
            return
        op.last_beat = time.monotonic()
        if self.is_coordinator and op.info is not None:
            try:
                self.catalog.heartbeat(op.info.id)
            except CheckpointError as e:
                log.warning("ckptdb: heartbeat failed: %s", e)

    def commit_checkpoint(self, *, blocking: bool | None = None) -> None:
        """Make the open checkpoint durable and visible: fsync, rename, one catalog transaction.

        Args:
            blocking: ``False`` returns at once and commits in a background thread (one process
                only): the files staged by ``save_state`` are written, hashed and fsynced, the
                directory renamed and the catalog row committed there. The next manager call (or
                ``wait()``) waits for it and raises its error. Default: ``SaveOptions.blocking``.

        Example:
            >>> manager.save_state(state)            # SaveOptions(blocking=False): a memcpy
            >>> manager.commit_checkpoint()          # returns at once; training goes on
            >>> manager.wait()                       # optional: block until committed (or raise)
        """
        op = self._require_open()
        blocking = self.save_options.blocking if blocking is None else blocking
        if blocking:
            self._commit(op)
            return
        if self.gang.size > 1:
            raise InvalidOperationError("commit_checkpoint(blocking=False) is single-process only")
        self._open = None  # the background thread owns it now; begin_checkpoint waits for it
        self._background.submit(op.step_nr, lambda: self._commit(op))

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for a background commit (``blocking=False``); raise its error if it failed.

        Returns False when ``timeout`` (seconds) expired first.

        Raises:
            BackgroundCommitError: the background commit failed; it was rolled back and earlier
                checkpoints are intact.
        """
        return self._background.wait(timeout)

    def _commit(self, op: _Open) -> None:
        _hooks.hook("commit.start")
        self._heartbeat(op)  # the staged writes and fsyncs below may take long: start them with a fresh beat
        if op.staged:
            staged, op.staged = op.staged, []

            def write_staged() -> None:
                op.writer.write_torch_many(staged)

            self._write_all(op, "commit_checkpoint", write_staged)
        commit_started = time.perf_counter()

        def write_score() -> None:
            if self.is_coordinator and "score" in op.scores:
                op.writer.write_bytes(layout.SCORE_FILE, f"{op.scores['score']}\n".encode(), kind="score")

        self._write_all(op, "commit_checkpoint", write_score)
        # every rank's (path, size, digest) to the coordinator; a lost rank rolls back everywhere
        try:
            records: list[list[FileRecord]] = collective(
                self.gang, lambda: self.gang.all_gather_object(list(op.writer.records.values())), "commit_checkpoint"
            )
        except RankLostError as e:
            raise self._fail(op, "commit_checkpoint", e) from e

        def coordinator() -> CheckpointInfo:
            assert op.info is not None
            files: dict[str, ShardInfo] = {}
            for recs in records:
                for r in recs:
                    files[r.path] = ShardInfo(r.path, r.size_bytes, r.hash_algorithm, r.digest, r.rank, r.kind)
            try:
                op.writer.finalize()
            except OSError as e:
                raise self._fail(op, "commit_checkpoint", e) from e
            _hooks.hook("commit.before_lock")
            timings = SaveTimings(op.stage_seconds, op.writer.write_seconds, op.writer.sync_seconds, commit_started)
            moved: bool | None = None  # None: not published
            publishing = False
            try:
                # publish (renames) + catalog commit under the run's lock: recovery, gc and delete
                # re-check rows under the same lock, so none acts between the rename and the commit
                with self.catalog.run_lock(self._run.id):
                    row = self.catalog.by_tokens([op.token]).get(op.token)
                    if row is None or row.state != State.PENDING.value:
                        publishing = True  # (its own message, below)
                        raise CheckpointError(
                            f"step {op.step_nr}: the pending checkpoint was rolled back by another process "
                            f"({row.state if row else 'row gone'}); nothing was published, "
                            "earlier checkpoints are intact"
                        )
                    publishing = True
                    _hooks.hook("commit.locked")
                    moved = publish(self.checkpoint_dir, op.step_nr, op.token, fsync=self.save_options.fsync)
                    _hooks.hook("commit.after_publish")
                    info = self.catalog.commit(
                        op.info.id, files.values(), op.scores, op.user_metadata, self._who, timings=timings
                    )
                    _hooks.hook("commit.before_unlock")
            except CheckpointError as e:
                if moved is None and publishing:
                    raise self._fail(op, "commit_checkpoint", e) from e  # publish put back what it had moved
                if moved is None:  # the catalog failed before anything was published
                    err = CheckpointError(
                        f"step {op.step_nr}: the catalog commit failed ({e}); the checkpoint was not committed "
                        "and earlier checkpoints are intact"
                    )
                    raise self._fail(op, "commit_checkpoint", err) from e
                committed = self._undo_publish(op, moved)
                if committed is None:
                    raise CheckpointError(
                        f"step {op.step_nr}: the catalog commit failed ({e}); the checkpoint was not committed "
                        "and earlier checkpoints are intact"
                    ) from e
                info = committed  # the COMMIT reached the catalog although the call failed
            _hooks.hook("commit.after_unlock")
            if moved:
                try:
                    remove_tree(
                        self.checkpoint_dir / layout.old_dir_name(op.step_nr, op.token), fsync=self.save_options.fsync
                    )
                except OSError as e:  # the commit stands; recovery removes the superseded copy
                    log.warning("ckptdb: could not remove the superseded copy of step %d: %s", op.step_nr, e)
            _hooks.hook("commit.after_remove_old")
            return info

        try:
            self._on_coordinator(coordinator, "commit_checkpoint")
        finally:
            self._open = None
            release_token(op.token)
        if self.retention is not None:
            _hooks.hook("commit.before_retention")
            try:
                self.apply_retention(self.retention)
            except CheckpointError as e:  # the commit stands; the next commit (or gc) prunes
                log.warning("ckptdb: retention after step %d failed: %s", op.step_nr, e)

    def _undo_publish(self, op: _Open, moved: bool) -> CheckpointInfo | None:
        """The catalog commit failed after the rename: put the directories back if the row is not committed.

        Returns the row when it turns out committed (the COMMIT reached the catalog); None when the
        publish was undone (or left to recovery: catalog unreachable). Raises CheckpointError saying
        where the committed copy is when a rename back fails.
        """
        try:
            with self.catalog.run_lock(self._run.id):  # decided and undone with no commit/recovery in between
                row = self.catalog.by_tokens([op.token]).get(op.token)
                if row is not None and row.state == State.COMMITTED.value:
                    return row
                unpublish(self.checkpoint_dir, op.step_nr, op.token, moved_aside=moved, fsync=self.save_options.fsync)
                if row is not None and row.state == State.PENDING.value:
                    self.catalog.abort(row.id, "catalog commit failed", self._who)
        except CheckpointError as e:  # catalog unreachable: the next open's recovery decides from the row
            log.warning("ckptdb: step %d: could not undo the publish (%s); recovery will", op.step_nr, e)
            return None
        except OSError as e:
            raise CheckpointError(
                f"step {op.step_nr}: the catalog commit failed and putting the directories back failed ({e}); "
                + committed_copy_whereabouts(self.checkpoint_dir, op.step_nr, op.token, moved)
            ) from e
        op.writer.abort()  # the new copy, back at its temporary name
        return None

    def abort_checkpoint(self) -> None:
        """Discard the open checkpoint: its temporary directory is removed, its row marked 'aborted'."""
        op = self._require_open()
        try:
            if self.gang.size > 1:
                collective(self.gang, self.gang.barrier, "abort_checkpoint")
        finally:
            self._rollback(op, "abort_checkpoint")

    # -- reading ------------------------------------------------------------------------------

    def _committed(self, step_nr: int) -> tuple[CheckpointInfo, list[ShardInfo]]:
        live = self.catalog.live(self._run.id, step_nr)
        if live is None or live.state == State.DELETING.value:
            raise CheckpointNotFoundError(
                f"step {step_nr} has no committed checkpoint in run {self.run_name!r}", step_nr=step_nr
            )
        if live.state in (State.CORRUPT.value, State.MISSING.value):
            raise CheckpointCorruptError(
                step_nr,
                str(self.checkpoint_dir / live.directory),
                "an intact checkpoint",
                f"state {live.state!r} in the catalog",
                missing=live.state == State.MISSING.value,
            )
        return live, self.catalog.shards(live.id)

    def _verify_and_mark(self, info: CheckpointInfo, shards: list[ShardInfo], verify: str) -> None:
        # sizes are always checked (a stat per file); digests unless verify="size"
        recs = [FileRecord(s.path, s.size_bytes, s.hash_algorithm, s.digest) for s in shards]
        try:
            step_dir = layout.step_path(self.checkpoint_dir, info.step_nr, info.directory)
            owner = read_owner(step_dir)
            if owner is not None and owner != info.token:  # another row's copy (an overwrite mid-way)
                raise CheckpointCorruptError(
                    info.step_nr,
                    str(step_dir),
                    f"the copy of checkpoint #{info.id}",
                    "another checkpoint's copy",
                    missing=True,
                )
            check_files(step_dir, recs, info.step_nr, digest=verify == "digest")
        except CheckpointCorruptError as e:
            self._mark_damaged(info, e)
            raise

    def _mark_damaged(self, info: CheckpointInfo, e: CheckpointCorruptError) -> None:
        if not self.is_coordinator:
            return
        if e.missing and directory_unavailable(self.catalog, self._run, self.checkpoint_dir) is not None:
            return  # the whole directory is gone or empty (unmounted?): not this checkpoint's damage
        step_dir = self.checkpoint_dir / info.directory
        aside = set_aside_copy(self.checkpoint_dir, info)
        if aside is not None:  # its copy is set aside by an overwrite (or a failed one): not damage
            log.warning("ckptdb: step %d: its committed copy is at %s (an overwrite stopped)", info.step_nr, aside)
            return
        state = State.MISSING if (e.missing and not step_dir.exists()) else State.CORRUPT
        try:
            self.catalog.mark_damaged(info.id, state, str(e), self._who)
        except CheckpointError as err:
            log.warning("ckptdb: could not record damage of step %d: %s", info.step_nr, err)

    def load_checkpoint(
        self, step_nr: int, *, verify: str | None = None, sharded_state: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Load a committed checkpoint's state for this rank (model, rank and replicated files merged).

        With ``sharded_state`` (a state dict shaped for the current world, e.g. from
        ``torch.distributed.checkpoint.state_dict.get_state_dict``), the checkpoint's sharded part
        is also loaded into it in place, resharded (see :meth:`load_sharded_state`), and its keys
        are included in the result.

        Raises:
            CheckpointNotFoundError: no committed checkpoint at ``step_nr``.
            CheckpointCorruptError: a file's size or digest differs from the catalog (the catalog
                then records the checkpoint as 'corrupt' or 'missing').
        """
        self.wait()
        step_nr = validation.step_nr(step_nr)
        verify = self.load_options.verify if verify is None else validation.verify_mode(verify)
        info, shards = self._on_coordinator(lambda: self._committed(step_nr), "load_checkpoint")
        return self._load_state(info, shards, verify, sharded_state)

    def load_sharded_state(self, step_nr: int, state_dict: dict[str, Any], *, verify: str | None = None) -> None:
        """Load the sharded part of a committed checkpoint into ``state_dict``, in place.

        ``state_dict`` decides the target layout: DTensors of the current mesh (FSDP2 at any world
        size), or plain tensors in one process without a process group. DCP reshards, so a
        checkpoint saved at world size 2 loads at world sizes 1 and 4. Each rank checks the size
        and digest of every file it reads against the catalog first. Collective::

            model_sd, optim_sd = get_state_dict(model, optimizer)
            manager.load_sharded_state(step_nr, {"model": model_sd, "optimizer": optim_sd})
            set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)

        Raises:
            CheckpointNotFoundError: no committed checkpoint at ``step_nr``, or it has no sharded part.
            CheckpointCorruptError: a file differs from the catalog (recorded as 'corrupt'/'missing').
        """
        step_nr = validation.step_nr(step_nr)
        info, shards = self._on_coordinator(lambda: self._committed(step_nr), "load_sharded_state")
        self._load_sharded(
            info, shards, state_dict, self.load_options.verify if verify is None else validation.verify_mode(verify)
        )

    def _load_sharded(
        self, info: CheckpointInfo, shards: list[ShardInfo], state_dict: dict[str, Any], verify: str
    ) -> None:
        prefix = sharded_io.SHARDED_DIR + "/"
        records = {
            s.path: FileRecord(s.path, s.size_bytes, s.hash_algorithm, s.digest, s.rank, s.kind)
            for s in shards
            if s.path.startswith(prefix)
        }
        if not records:
            raise CheckpointNotFoundError(f"step {info.step_nr} has no sharded state", step_nr=info.step_nr)

        def load() -> None:
            sharded_io.load_sharded(
                state_dict,
                layout.step_path(self.checkpoint_dir, info.step_nr, info.directory),
                records,
                info.step_nr,
                process_group=process_group_of(self.gang),
                verify=verify,
            )

        try:
            run_on_all(self.gang, load, "load_sharded_state")
        except CheckpointCorruptError as e:
            self._mark_damaged(info, e)
            raise

    def _load_state(
        self,
        info: CheckpointInfo,
        shards: list[ShardInfo],
        verify: str,
        sharded_state: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        tp_rank, tp_size = self._sfx
        wanted = [layout.rank_file(self.dp_gang.rank, tp_rank, tp_size), layout.replicated_file(tp_rank, tp_size)]
        by_path = {s.path: s for s in shards}
        mine = [by_path[p] for p in wanted if p in by_path]
        model = by_path.get(layout.model_file(tp_rank, tp_size))

        def load() -> dict[str, Any]:
            for s in shards:  # a file list naming a path outside the step directory is a corrupt row
                layout.check_relpath(s.path, info.step_nr)
            self._verify_and_mark(info, [*mine, *([model] if model else [])], verify)
            step_dir = layout.step_path(self.checkpoint_dir, info.step_nr, info.directory)
            state: dict[str, Any] = {}
            for s in mine:
                part = self._load_file(info, step_dir, s)
                if not isinstance(part, dict):
                    raise CheckpointCorruptError(info.step_nr, s.path, "a dict", type(part).__name__)
                state.update(part)
            if model is not None:
                part = self._load_file(info, step_dir, model)
                key = part.get("model_key", "model") if isinstance(part, dict) else "model"
                if key not in state and isinstance(part, dict) and key in part:
                    state[key] = part[key]
            state.pop(_MODEL_KEY_ENTRY, None)  # fairseq2's FSDP rank files carry it; fairseq2's loader drops it
            if not state and sharded_state is None:
                hint = ""
                if any(s.path.startswith(sharded_io.SHARDED_DIR + "/") for s in shards):
                    hint = " outside its sharded part (load that with sharded_state= or load_sharded_state())"
                raise CheckpointNotFoundError(
                    f"step {info.step_nr} has no state for this rank{hint}", step_nr=info.step_nr
                )
            return state

        try:
            state = run_on_all(self.gang, load, "load_checkpoint")
        except CheckpointCorruptError as e:  # found on any rank: the coordinator records it
            self._mark_damaged(info, e)
            raise
        if sharded_state is not None:
            self._load_sharded(info, shards, sharded_state, verify)
            state.update(sharded_state)
        return state

    def _load_file(self, info: CheckpointInfo, step_dir: Path, s: ShardInfo) -> Any:
        try:
            return load_torch(
                layout.shard_path(step_dir, s.path, info.step_nr), info.step_nr, mmap=self.load_options.mmap
            )
        except CheckpointCorruptError as e:
            self._mark_damaged(info, e)
            raise
        except UnsafeCheckpointFileError as e:  # a file swapped for a hostile pickle: damage too
            self._mark_damaged(info, CheckpointCorruptError(info.step_nr, s.path, "a weights-only torch file", str(e)))
            raise

    def load_last_checkpoint(
        self, *, verify: str | None = None, sharded_state: dict[str, Any] | None = None
    ) -> tuple[int, dict[str, Any]]:
        """Load the newest committed checkpoint (``sharded_state``: as in :meth:`load_checkpoint`).

        A corrupt or missing newest checkpoint is skipped (warning; recorded in the catalog) and
        the next older intact one is loaded, unless ``LoadOptions(fallback=False)``.

        Raises:
            CheckpointNotFoundError: the run has no committed checkpoint.
        """
        self.wait()
        verify = self.load_options.verify if verify is None else validation.verify_mode(verify)
        below: int | None = None
        while True:

            def newest(below: int | None = below) -> tuple[CheckpointInfo, list[ShardInfo]] | None:
                c = self.catalog.newest_committed(self._run.id, below=below)
                return None if c is None else (c, self.catalog.shards(c.id))

            found = self._on_coordinator(newest, "load_last_checkpoint")
            if found is None:
                hint = ""
                foreign = self.last_recovery.foreign if self.last_recovery else []
                if foreign and below is None:
                    hint = (
                        f"; {len(foreign)} step directories here are not in the catalog "
                        f"({', '.join(sorted(foreign)[:3])}...): adopt them with `ckptdb import`"
                    )
                raise CheckpointNotFoundError(
                    f"run {self.run_name!r} has no committed checkpoint"
                    + ("" if below is None else f" below step {below} that is intact")
                    + hint
                )
            info, shards = found
            try:
                return info.step_nr, self._load_state(info, shards, verify, sharded_state)
            except (CheckpointCorruptError, UnsafeCheckpointFileError) as e:
                if not self.load_options.fallback:
                    raise
                log.warning("ckptdb: step %d is damaged (%s); falling back to an older checkpoint", info.step_nr, e)
                below = info.step_nr

    def load_metadata(self, step_nr: int) -> dict[str, Any] | None:
        """The ``save_metadata`` mapping of a committed checkpoint, or None when it has none."""
        self.wait()
        step_nr = validation.step_nr(step_nr)
        info, shards = self._on_coordinator(lambda: self._committed(step_nr), "load_metadata")
        s = next((x for x in shards if x.path == layout.metadata_file(*self._sfx)), None)
        if s is None:
            return None
        self._verify_and_mark(info, [s], self.load_options.verify)
        result = self._load_file(info, layout.step_path(self.checkpoint_dir, info.step_nr, info.directory), s)
        return dict(result) if isinstance(result, Mapping) else None

    def has_checkpoint(self, step_nr: int | None = None) -> bool:
        """Whether ``step_nr`` (or, with None, any step) is committed."""
        if step_nr is not None:
            step_nr = validation.step_nr(step_nr)
        steps = self.get_step_numbers()
        return bool(steps) if step_nr is None else step_nr in steps

    def get_step_numbers(self) -> list[int]:
        """Committed steps, ascending (a catalog query; no directory is listed)."""
        self.wait()
        return self._on_coordinator(lambda: self.catalog.committed_steps(self._run.id), "get_step_numbers")

    def get_checkpoints(self) -> list[CheckpointInfo]:
        """Every checkpoint row of this run (all states), with scores."""
        self.wait()
        return self._on_coordinator(lambda: self.catalog.checkpoints(self._run.id), "get_checkpoints")

    # -- deleting -----------------------------------------------------------------------------

    def delete_checkpoint(
        self,
        step_nr: int,
        *,
        missing_ok: bool = False,
        preserve_model: bool = False,
        reason: str = "manual",
    ) -> None:
        """Delete a checkpoint in two phases: mark 'deleting', remove files, mark 'deleted'.

        With ``preserve_model=True`` the model files (and ``score.txt``) stay (the catalog records
        ``model_preserved``). A step that only has such a preserved model left is a step
        directory as in fairseq2: deleting it without ``preserve_model`` removes the model files.
        """
        self.wait()
        step_nr = validation.step_nr(step_nr)
        self._on_coordinator(lambda: self._delete(step_nr, missing_ok, preserve_model, reason), "delete_checkpoint")

    def _delete(self, step_nr: int, missing_ok: bool, preserve_model: bool, reason: str) -> None:
        bad: tuple[CheckpointInfo, CheckpointCorruptError] | None = None
        with self.catalog.run_lock(self._run.id):  # the row claimed is the row read: no commit in between
            live = self.catalog.live(self._run.id, step_nr)
            leftover = self.catalog.preserved_model(self._run.id, step_nr) if live is None else None
            if leftover is not None and preserve_model:
                return  # only its model is left already
            if (live is None and leftover is None) or (live is not None and live.state == State.DELETING.value):
                if missing_ok:
                    return
                raise CheckpointNotFoundError(f"step {step_nr} has no committed checkpoint to delete", step_nr=step_nr)
            if not os.access(self.checkpoint_dir, os.W_OK):
                raise CheckpointError(f"step {step_nr}: {str(self.checkpoint_dir)!r} is read-only; nothing was deleted")
            row = live if live is not None else leftover
            assert row is not None
            try:  # a row whose directory leads elsewhere is refused before anything changes
                layout.step_path(self.checkpoint_dir, row.step_nr, row.directory)
            except CheckpointCorruptError as e:
                bad = (row, e)
            if bad is None and leftover is not None:  # a preserved model's leftover: its model files go the same way
                self.catalog.claim_model_only(leftover.id, reason, self._who)
                info = dataclasses.replace(leftover, model_preserved=False, state=State.DELETING.value)
            elif bad is None:
                assert live is not None
                self.catalog.mark_deleting(live.id, reason, self._who, preserve_model=preserve_model)
                info = dataclasses.replace(live, model_preserved=preserve_model)
                _hooks.hook("delete.claimed_locked")
        if bad is not None:  # recorded after the lock's transaction ended (a raise inside would roll it back)
            if bad[0].state != State.DELETED.value:
                self._mark_damaged(bad[0], bad[1])
            raise bad[1]
        _hooks.hook("delete.after_claim")
        try:
            finish_delete(self.catalog, info, self.checkpoint_dir, self._who, fsync=self.save_options.fsync)
        except OSError as e:
            raise CheckpointError(
                f"step {step_nr}: removing its files failed ({e}); it is marked 'deleting' and the deletion "
                "finishes on the next open"
            ) from e

    def keep_last_n_checkpoints(self, n: int, *, preserve_model: bool = False) -> list[int]:
        """Delete all but the newest ``n`` checkpoints (pinned ones are never deleted).

        As in fairseq2, a model-only step left by an earlier ``preserve_model=True`` deletion
        still counts as a step: when it is not among the newest ``n`` its model files are
        removed too (unless ``preserve_model``). The trainer pattern
        ``keep_last_n_checkpoints(n_models)`` then ``keep_last_n_checkpoints(n_ckpts,
        preserve_model=True)`` leaves exactly what fairseq2 leaves. Returns the steps whose files
        were removed.
        """
        from ckptdb import retention

        return self.apply_retention(retention.KeepLast(validation.count(n, "n")), preserve_model=preserve_model)

    def keep_best_n_checkpoints(
        self,
        n: int,
        *,
        lower_better: bool = False,
        metric: str = "score",
        preserve_model: bool = False,
    ) -> list[int]:
        """Delete all but the ``n`` best-scored checkpoints by ``metric``.

        The newest committed checkpoint (the resume point) and pinned ones are always kept.
        Unscored, NaN- and inf-scored checkpoints are never "best". Ties: the later step wins.
        Model-only steps (earlier ``preserve_model=True`` deletions) rank by their score like the
        others, as in fairseq2, and lose their model files when they drop out (unless
        ``preserve_model``). Returns the steps whose files were removed.
        """
        from ckptdb import retention

        policy = retention.KeepBest(
            validation.count(n, "n"), metric=validation.name(metric, "metric"), lower_better=lower_better
        )
        return self.apply_retention(policy, preserve_model=preserve_model)

    def apply_retention(self, policy: Any, *, preserve_model: bool = False) -> list[int]:
        """Apply a retention policy (see :mod:`ckptdb.retention`); returns the deleted steps."""
        self.wait()
        from ckptdb import cleanup, retention, verify

        def coordinator() -> list[int]:
            if not os.access(self.checkpoint_dir, os.W_OK):
                log.warning("ckptdb: %s is read-only; retention deletes nothing", self.checkpoint_dir)
                return []
            gone = directory_unavailable(self.catalog, self._run, self.checkpoint_dir)
            if gone is not None:
                log.warning("ckptdb: retention deletes nothing: %s", gone)
                return []
            # never count a checkpoint damaged behind our back as one of the kept ones (a stat per file)
            while verify.mark_damaged_by_size(
                self.catalog,
                self._run,
                self.checkpoint_dir,
                retention.plan(self.catalog, self._run.id, policy).keep,
                self._who,
            ):
                pass
            # one transaction decides (one query) and claims; then the files go (docs/retention.md)
            _hooks.hook("retention.before_claim")
            return cleanup.apply_policy(
                self.catalog,
                self._run,
                self.checkpoint_dir,
                policy,
                self._who,
                preserve_model=preserve_model,
                fsync=self.save_options.fsync,
            )

        return self._on_coordinator(coordinator, "retention")

    def retention_plan(self, policy: Any) -> Any:
        """What ``policy`` would keep (with reasons) and delete, decided by the catalog; changes nothing."""
        from ckptdb import retention

        return self._on_coordinator(lambda: retention.plan(self.catalog, self._run.id, policy), "retention_plan")

    def pin(self, step_nr: int, label: str) -> None:
        """Protect ``step_nr`` from retention under ``label`` (moving the label if it exists)."""
        self.wait()
        step_nr = validation.step_nr(step_nr)
        label = validation.name(label, "pin label")
        self._on_coordinator(lambda: self.catalog.pin(self._run.id, step_nr, label), "pin")

    def unpin(self, label: str) -> bool:
        label = validation.name(label, "pin label")
        return self._on_coordinator(lambda: self.catalog.unpin(self._run.id, label), "unpin")

    # -- model metadata -----------------------------------------------------------------------

    def save_model_metadata(
        self,
        *,
        family: str | None = None,
        config: object = None,
        base_asset: str | None = None,
    ) -> None:
        """Write ``checkpoint_dir/model.yaml`` (fairseq2's asset card) and record it in the catalog."""

        def coordinator() -> None:
            card: dict[str, Any] = {"name": "checkpoint"}
            if base_asset is not None:
                card["base"] = base_asset
            if family is not None:
                card["model_family"] = family
            if config is not None:
                card["model_config"] = _config_dict(config)
            if self.tp_gang.size > 1:
                card["num_shards"] = self.tp_gang.size
            text = yaml.safe_dump(card, sort_keys=False)
            write_text_atomic(self.checkpoint_dir / layout.MODEL_METADATA_FILE, text, fsync=self.save_options.fsync)
            self.catalog.set_model_metadata(self._run.id, card)

        self._on_coordinator(coordinator, "save_model_metadata")

    def close(self) -> None:
        """Wait for a background commit (raising its error), then abort an open checkpoint (if any)."""
        try:
            self.wait()
        finally:
            if self._open is not None:
                self._rollback(self._open, "manager closed with the checkpoint open")

    def __enter__(self) -> FileCheckpointManager:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            self.close()
        except CheckpointError as e:  # don't hide the exception already propagating
            log.warning("ckptdb: %s", e)

    def __repr__(self) -> str:
        return (
            f"FileCheckpointManager({str(self.checkpoint_dir)!r}, catalog={masked(self.url)!r}, run={self.run_name!r})"
        )


def _config_dict(config: object) -> Any:
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    try:
        return json.loads(json.dumps(config, default=str))
    except (TypeError, ValueError) as e:
        raise InvalidArgumentError(f"model config cannot be written as YAML: {e}") from e


__all__ = ["FileCheckpointManager", "default_run_name"]

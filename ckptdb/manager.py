"""FileCheckpointManager: fairseq2's checkpoint API over a transactional SQL catalog.

This module is the thin public facade: argument checking, the gang plumbing, and delegation to the
protocol modules, each written once against the run's :class:`~ckptdb.storage.store.Store`:

=============================== ===========================================================
:mod:`ckptdb.commit`            begin, write (save_state, metadata, score), commit (publish +
                                catalog transaction), undo of a failed publish, abort, heartbeat
:mod:`ckptdb.load`              load (one step, the newest with fallback past damage, sharded
                                state, metadata) and recording damage found on the way
:mod:`ckptdb.delete`            delete_checkpoint and the retention calls (keep_*, apply_retention)
:mod:`ckptdb.recovery`          what opening a manager repairs (dead writers, unfinished deletions)
=============================== ===========================================================

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

Asynchronous saves (one process; ``SaveOptions(blocking=False)``): ``begin_checkpoint`` only
checks (the row and the directory are made by the background commit), ``save_state`` copies the
state into reused host staging buffers instead of writing it, ``commit_checkpoint()`` returns at
once and a background thread begins, writes, hashes, fsyncs, renames and commits the catalog row
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
import weakref
from collections.abc import Callable, Mapping, Set
from pathlib import Path
from typing import Any, TypeVar

import torch
import yaml

from ckptdb import _hooks, _proc, validation
from ckptdb import delete as deletion
from ckptdb.catalog import Catalog, CheckpointInfo, RunInfo
from ckptdb.catalog.session import masked, sqlite_url
from ckptdb.commit import Committer, OpenCheckpoint
from ckptdb.context import RunContext
from ckptdb.distributed import Gang, LocalGang, as_gang
from ckptdb.errors import CheckpointError, InvalidArgumentError, InvalidOperationError
from ckptdb.load import Loader
from ckptdb.options import LoadOptions, RecoveryOptions, SaveOptions
from ckptdb.recovery import RecoveryReport, recover_run
from ckptdb.storage import layout
from ckptdb.storage.hashing import new_hasher
from ckptdb.storage.location import LocalLocation, ObjectLocation, parse_location, require_shared_catalog
from ckptdb.storage.staging import StagingArea
from ckptdb.storage.store import Store, open_store

log = logging.getLogger("ckptdb")
T = TypeVar("T")


def default_run_name(checkpoint_dir: Path | str) -> str:
    """A run is named after its checkpoint directory's absolute path or URL (unique on a shared catalog)."""
    name = str(checkpoint_dir)
    return name if len(name) <= validation.MAX_NAME else "…" + name[-(validation.MAX_NAME - 1) :]


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
        storage_options: for an ``s3://`` run, overrides of the AWS environment (``endpoint_url``,
            ``region``, ``access_key_id``, ``secret_access_key``, ``profile``, ``part_size``,
            ``concurrency``, ...; see docs/object-storage.md). Ignored for a local directory.
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
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        if isinstance(gang, str | os.PathLike):
            raise InvalidArgumentError(
                f"FileCheckpointManager's second positional argument is the gang, not a {type(gang).__name__}: "
                "pass the catalog URL as catalog=..."
            )
        location = parse_location(checkpoint_dir)
        if isinstance(location, ObjectLocation):
            require_shared_catalog(location, catalog or os.environ.get("CKPTDB_URL"))
        save_options = save_options or SaveOptions()
        store: Store = open_store(
            location, fsync=save_options.fsync, storage_options=storage_options, object_store=True
        )
        # the local directory; None for an object store (its url is ``self.store.url``)
        self.checkpoint_dir: Path | None = location.path if isinstance(location, LocalLocation) else None
        gang_ = as_gang(gang)
        if (dp_gang is None) != (tp_gang is None):
            raise InvalidArgumentError("dp_gang and tp_gang must be given together")
        self.retention = retention
        new_hasher(save_options.hash_algorithm)  # fail early on an unknown algorithm
        url = catalog or os.environ.get("CKPTDB_URL") or sqlite_url(location.path / layout.CATALOG_FILE)  # type: ignore[union-attr]
        self._ctx = RunContext(
            store=store,
            gang=gang_,
            dp_gang=as_gang(dp_gang) if dp_gang is not None else gang_,
            tp_gang=as_gang(tp_gang) if tp_gang is not None else LocalGang(),
            save_options=save_options,
            load_options=load_options or LoadOptions(),
            recovery_options=recovery_options or RecoveryOptions(),
            url=url,
            run_name=validation.name(run if run is not None else default_run_name(store.url), "run"),
            who=(_proc.hostname(), os.getpid()),
        )
        me = weakref.ref(self)  # no cycle: an abandoned manager releases its open checkpoint's token at once

        def after_commit(step_nr: int) -> None:
            m = me()
            if m is not None:
                m._after_commit(step_nr)

        self._committer = Committer(self._ctx, after_commit)
        self._loader = Loader(self._ctx)
        if not self.save_options.blocking and self.gang.size > 1:
            raise InvalidArgumentError("SaveOptions(blocking=False): asynchronous saves are single-process only")
        self._ctx.run_ = self._on_coordinator(self._open_catalog, "opening the catalog")

    # -- plumbing -----------------------------------------------------------------------------

    @property
    def store(self) -> Store:
        """Where this run's payload lives (:mod:`ckptdb.storage.store`)."""
        return self._ctx.store

    @property
    def gang(self) -> Gang:
        return self._ctx.gang

    @property
    def dp_gang(self) -> Gang:
        return self._ctx.dp_gang

    @property
    def tp_gang(self) -> Gang:
        return self._ctx.tp_gang

    @property
    def save_options(self) -> SaveOptions:
        return self._ctx.save_options

    @property
    def load_options(self) -> LoadOptions:
        return self._ctx.load_options

    @property
    def recovery_options(self) -> RecoveryOptions:
        return self._ctx.recovery_options

    @property
    def url(self) -> str:
        """The catalog's SQLAlchemy URL."""
        return self._ctx.url

    @property
    def run_name(self) -> str:
        return self._ctx.run_name

    @property
    def last_recovery(self) -> RecoveryReport | None:
        """What the last recovery (on open, or :meth:`recover`) did on this rank's catalog."""
        return self._ctx.last_recovery

    @property
    def is_coordinator(self) -> bool:
        return self._ctx.is_coordinator

    @property
    def catalog(self) -> Catalog:
        return self._ctx.catalog

    @property
    def run(self) -> RunInfo:
        return self._ctx.run

    @property
    def _open(self) -> OpenCheckpoint | None:
        """The checkpoint being written (None when none is open)."""
        return self._committer.open

    @_open.setter
    def _open(self, value: OpenCheckpoint | None) -> None:
        self._committer.open = value

    @property
    def _staging(self) -> StagingArea:
        return self._committer.staging

    def _on_coordinator(self, fn: Callable[[], T], what: str) -> T:
        """Run ``fn`` on rank 0 and give every rank its result, or its error (same type everywhere)."""
        return self._ctx.on_coordinator(fn, what)

    def _open_catalog(self) -> RunInfo:
        self.store.ensure_root()
        self._ctx.catalog_ = Catalog(self.url)
        run = self._ctx.catalog_.ensure_run(self.run_name, self.store.url)
        if self.recovery_options.on_open:
            self._ctx.last_recovery = self._recover(run)
        return run

    def _recover(self, run: RunInfo) -> RecoveryReport | None:
        if not self.store.writable():
            log.warning("ckptdb: %s is read-only; skipping recovery (loads still work)", self.store.url)
            return None
        try:
            if self.checkpoint_dir is None:  # an object store: catalog-driven, nothing to rename
                from ckptdb.objrecovery import recover_object_run

                return recover_object_run(
                    self.catalog, run, self.store, self._ctx.who, stale_after=self.recovery_options.stale_after
                )
            return recover_run(
                self.catalog,
                run,
                self.checkpoint_dir,
                self._ctx.who,
                stale_after=self.recovery_options.stale_after,
                fsync=self.save_options.fsync,
            )
        except OSError as e:  # EIO, ENOSPC...: every step of recovery is redone on the next try
            raise CheckpointError(
                f"recovery of run {run.name!r} in {self.store.url!r} failed ({e}); nothing committed "
                "was lost; open the manager again (or run `ckptdb gc`) to finish it"
            ) from e

    def recover(self) -> RecoveryReport | None:
        """Roll back dead writers' pending checkpoints and remove debris (done on open)."""
        self.wait()

        return self._on_coordinator(lambda: self._recover(self.run), "recovery")

    # -- writing (ckptdb.commit) ----------------------------------------------------------------

    def begin_checkpoint(self, step_nr: int, *, overwrite: bool = False) -> None:
        """Start checkpoint ``step_nr``: a 'pending' catalog row, then a temporary directory.

        A step whose checkpoint is damaged (``corrupt`` or ``missing``, e.g. after
        ``load_last_checkpoint`` fell back past it) may be saved again without ``overwrite``: the
        commit supersedes the damaged copy, whose files stay in place until then.

        With ``SaveOptions(blocking=False)`` this checks and makes nothing: the row and the directory
        are made by the background commit (a writer that takes the step in between makes that
        commit fail; the next call raises ``BackgroundCommitError``).

        Raises:
            InvalidOperationError: a checkpoint is already open.
            CheckpointExistsError: ``step_nr`` is committed and ``overwrite`` is False.
        """
        if self._open is not None:
            raise InvalidOperationError("`begin_checkpoint()` has already been called.")
        self.wait()
        self._committer.begin(validation.step_nr(step_nr), overwrite)

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
        self._committer.require_open(begun=False)
        model_key = validation.name(model_key, "model_key")
        keys = validation.key_set(replicated_keys, "replicated_keys")
        self._committer.save_state(state, model_key, keys)

    def save_consolidated_fsdp_model(self, model: torch.nn.Module, *, model_key: str = "model") -> None:
        """Write the full model state dict as ``model.pt`` (``model.<tp_rank>.pt`` with TP > 1).

        DTensor parameters (FSDP2 ``fully_shard``) are gathered one at a time on every rank of
        their mesh; data-parallel rank 0 writes the file. ``DDP`` / ``torch.compile`` prefixes are
        removed. The result loads later in one process without any process group:
        ``FileCheckpointManager(dir).load_checkpoint(step)["model"]``. Collective.
        """
        self._committer.save_consolidated_fsdp_model(model, model_key)

    def save_metadata(self, metadata: Mapping[str, Any]) -> None:
        """Store a metadata mapping: ``metadata.pt`` in the step and JSON in the catalog."""
        self._committer.save_metadata(metadata)

    def save_score(self, score: float | None, *, metric: str = "score") -> None:
        """Record a score for the open checkpoint (several named metrics allowed).

        ``None`` is ignored (fairseq2's convention). NaN and infinities are stored but never rank
        as "best".
        """
        self._committer.save_score(score, metric)

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
        self._committer.require_open(begun=False)
        self._committer.commit_checkpoint(self.save_options.blocking if blocking is None else blocking)

    def _after_commit(self, step_nr: int) -> None:
        if self.retention is not None:
            _hooks.hook("commit.before_retention")
            try:
                self.apply_retention(self.retention)
            except CheckpointError as e:  # the commit stands; the next commit (or gc) prunes
                log.warning("ckptdb: retention after step %d failed: %s", step_nr, e)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for a background commit (``blocking=False``); raise its error if it failed.

        Returns False when ``timeout`` (seconds) expired first.

        Raises:
            BackgroundCommitError: the background commit failed; it was rolled back and earlier
                checkpoints are intact.
        """
        return self._committer.wait(timeout)

    def abort_checkpoint(self) -> None:
        """Discard the open checkpoint: its temporary directory is removed, its row marked 'aborted'."""
        self._committer.abort_checkpoint()

    # -- reading (ckptdb.load) ------------------------------------------------------------------

    def _verify_mode(self, verify: str | None) -> str:
        return self.load_options.verify if verify is None else validation.verify_mode(verify)

    def load_checkpoint(
        self,
        step_nr: int,
        *,
        verify: str | None = None,
        sharded_state: dict[str, Any] | None = None,
        into: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Load a committed checkpoint's state for this rank (model, rank and replicated files merged).

        With ``sharded_state`` (a state dict shaped for the current world, e.g. from
        ``torch.distributed.checkpoint.state_dict.get_state_dict``), the checkpoint's sharded part
        is also loaded into it in place, resharded (see :meth:`load_sharded_state`), and its keys
        are included in the result.

        With ``into`` (a state shaped like the saved one, e.g. ``{"model": model.state_dict(),
        "optimizer": optimizer.state_dict()}``), each saved tensor at a key path ``into`` also has
        is loaded into ``into``'s tensor there, in place, and the result holds that tensor: the
        model's parameters are then loaded without ``load_state_dict``, and a large file is read
        once straight into them (no new memory, no page cache; digests still checked). Tensors
        only ``into`` has are left as they are; a dtype or shape that differs is refused
        (``InvalidArgumentError`` naming the key) before anything is written. If the load fails
        (a digest mismatch, an I/O error), ``into``'s tensors may hold part of it, as with DCP's
        in-place load; load again, e.g. with :meth:`load_last_checkpoint`.

        Raises:
            CheckpointNotFoundError: no committed checkpoint at ``step_nr``.
            CheckpointCorruptError: a file's size or digest differs from the catalog (the catalog
                then records the checkpoint as 'corrupt' or 'missing').
            InvalidArgumentError: a tensor of ``into`` differs in dtype or shape from the saved one.
        """
        self.wait()
        step_nr = validation.step_nr(step_nr)
        return self._loader.load_checkpoint(step_nr, self._verify_mode(verify), sharded_state, into)

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
        self._loader.load_sharded_state(step_nr, state_dict, self._verify_mode(verify))

    def load_last_checkpoint(
        self,
        *,
        verify: str | None = None,
        sharded_state: dict[str, Any] | None = None,
        into: Mapping[str, Any] | None = None,
    ) -> tuple[int, dict[str, Any]]:
        """Load the newest committed checkpoint (``sharded_state``, ``into``: as in :meth:`load_checkpoint`).

        A corrupt or missing newest checkpoint is skipped (warning; recorded in the catalog) and
        the next older intact one is loaded, unless ``LoadOptions(fallback=False)``.

        Raises:
            CheckpointNotFoundError: the run has no committed checkpoint.
        """
        self.wait()
        return self._loader.load_last_checkpoint(self._verify_mode(verify), sharded_state, into)

    def load_metadata(self, step_nr: int) -> dict[str, Any] | None:
        """The ``save_metadata`` mapping of a committed checkpoint, or None when it has none."""
        self.wait()
        return self._loader.load_metadata(validation.step_nr(step_nr))

    def has_checkpoint(self, step_nr: int | None = None) -> bool:
        """Whether ``step_nr`` (or, with None, any step) is committed."""
        if step_nr is not None:
            step_nr = validation.step_nr(step_nr)
        steps = self.get_step_numbers()
        return bool(steps) if step_nr is None else step_nr in steps

    def get_step_numbers(self) -> list[int]:
        """Committed steps, ascending (a catalog query; no directory is listed)."""
        self.wait()
        return self._on_coordinator(lambda: self.catalog.committed_steps(self.run.id), "get_step_numbers")

    def get_checkpoints(self) -> list[CheckpointInfo]:
        """Every checkpoint row of this run (all states), with scores."""
        self.wait()
        return self._on_coordinator(lambda: self.catalog.checkpoints(self.run.id), "get_checkpoints")

    # -- deleting (ckptdb.delete) ---------------------------------------------------------------

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
        self._on_coordinator(
            lambda: deletion.delete_checkpoint(self._ctx, step_nr, missing_ok, preserve_model, reason),
            "delete_checkpoint",
        )

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
        return self._on_coordinator(lambda: deletion.apply_retention(self._ctx, policy, preserve_model), "retention")

    def retention_plan(self, policy: Any) -> Any:
        """What ``policy`` would keep (with reasons) and delete, decided by the catalog; changes nothing."""
        from ckptdb import retention

        return self._on_coordinator(lambda: retention.plan(self.catalog, self.run.id, policy), "retention_plan")

    def pin(self, step_nr: int, label: str) -> None:
        """Protect ``step_nr`` from retention under ``label`` (moving the label if it exists)."""
        self.wait()
        step_nr = validation.step_nr(step_nr)
        label = validation.name(label, "pin label")
        self._on_coordinator(lambda: self.catalog.pin(self.run.id, step_nr, label), "pin")

    def unpin(self, label: str) -> bool:
        label = validation.name(label, "pin label")
        return self._on_coordinator(lambda: self.catalog.unpin(self.run.id, label), "unpin")

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
            self.store.write_text(layout.MODEL_METADATA_FILE, text)
            self.catalog.set_model_metadata(self.run.id, card)

        self._on_coordinator(coordinator, "save_model_metadata")

    def close(self) -> None:
        """Wait for a background commit (raising its error), then abort an open checkpoint (if any)."""
        try:
            self.wait()
        finally:
            if self._open is not None:
                self._committer.rollback(self._open, "manager closed with the checkpoint open")

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
        return f"FileCheckpointManager({self.store.url!r}, catalog={masked(self.url)!r}, run={self.run_name!r})"


def _config_dict(config: object) -> Any:
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    try:
        return json.loads(json.dumps(config, default=str))
    except (TypeError, ValueError) as e:
        raise InvalidArgumentError(f"model config cannot be written as YAML: {e}") from e


__all__ = ["FileCheckpointManager", "default_run_name"]

"""Deletion and retention calls of a manager (rank 0), in two phases: claim in the catalog, then remove.

``delete_checkpoint`` (one step)::

    under the run's lock: read the live row (or a model-only leftover), refuse a row whose directory
        leads elsewhere, mark it 'deleting' (or claim the leftover)           hook delete.claimed_locked
    after the lock:                                                          hook delete.after_claim
        finish_delete: under the lock re-read the row, set its directory aside (or unlink the
        non-model files with preserve_model), mark 'deleted'; remove the set-aside copy after the lock

``apply_retention`` (a policy): size-check the checkpoints the policy keeps (a damaged one does not
count as kept), then one transaction decides and claims (:func:`ckptdb.cleanup.apply_policy`), then
the files go, each as above. The crash windows and what recovery does about each are in
docs/architecture.md and docs/retention.md. A deletion interrupted after its claim stays
``deleting`` and is finished by the next open's recovery (or ``ckptdb gc``).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from ckptdb import _hooks
from ckptdb.catalog import CheckpointInfo
from ckptdb.catalog.models import State
from ckptdb.context import RunContext
from ckptdb.errors import CheckpointCorruptError, CheckpointError, CheckpointNotFoundError
from ckptdb.load import mark_damaged
from ckptdb.recovery import finish_delete
from ckptdb.verify import directory_unavailable

log = logging.getLogger("ckptdb")


def delete_checkpoint(ctx: RunContext, step_nr: int, missing_ok: bool, preserve_model: bool, reason: str) -> None:
    """Rank 0: delete ``step_nr`` (see the module docstring); ``step_nr`` is already validated."""
    catalog, store = ctx.catalog, ctx.store
    bad: tuple[CheckpointInfo, CheckpointCorruptError] | None = None
    with catalog.run_lock(ctx.run.id):  # the row claimed is the row read: no commit in between
        live = catalog.live(ctx.run.id, step_nr)
        leftover = catalog.preserved_model(ctx.run.id, step_nr) if live is None else None
        if leftover is not None and preserve_model:
            return  # only its model is left already
        if (live is None and leftover is None) or (live is not None and live.state == State.DELETING.value):
            if missing_ok:
                return
            raise CheckpointNotFoundError(f"step {step_nr} has no committed checkpoint to delete", step_nr=step_nr)
        if not store.writable():
            raise CheckpointError(f"step {step_nr}: {store.url!r} is read-only; nothing was deleted")
        row = live if live is not None else leftover
        assert row is not None
        try:  # a row whose directory leads elsewhere is refused before anything changes
            store.check_directory(row.step_nr, row.directory)
        except CheckpointCorruptError as e:
            bad = (row, e)
        if bad is None and leftover is not None:  # a preserved model's leftover: its model files go the same way
            catalog.claim_model_only(leftover.id, reason, ctx.who)
            info = dataclasses.replace(leftover, model_preserved=False, state=State.DELETING.value)
        elif bad is None:
            assert live is not None
            catalog.mark_deleting(live.id, reason, ctx.who, preserve_model=preserve_model)
            info = dataclasses.replace(live, model_preserved=preserve_model)
            _hooks.hook("delete.claimed_locked")
    if bad is not None:  # recorded after the lock's transaction ended (a raise inside would roll it back)
        if bad[0].state != State.DELETED.value:
            mark_damaged(ctx, bad[0], bad[1])
        raise bad[1]
    _hooks.hook("delete.after_claim")
    try:
        finish_delete(catalog, info, store, ctx.who, fsync=ctx.save_options.fsync)
    except OSError as e:
        raise CheckpointError(
            f"step {step_nr}: removing its files failed ({e}); it is marked 'deleting' and the deletion "
            "finishes on the next open"
        ) from e


def apply_retention(ctx: RunContext, policy: Any, preserve_model: bool) -> list[int]:
    """Rank 0: delete what ``policy`` does not keep; returns the deleted steps (see the module docstring)."""
    from ckptdb import cleanup, retention, verify

    if not ctx.store.writable():
        log.warning("ckptdb: %s is read-only; retention deletes nothing", ctx.store.url)
        return []
    if not ctx.store.is_local:
        from ckptdb import objrecovery

        return objrecovery.apply_policy(ctx.catalog, ctx.run, ctx.store, policy, ctx.who, preserve_model=preserve_model)
    gone = directory_unavailable(ctx.catalog, ctx.run, ctx.checkpoint_dir)
    if gone is not None:
        log.warning("ckptdb: retention deletes nothing: %s", gone)
        return []
    # never count a checkpoint damaged behind our back as one of the kept ones (a stat per file)
    while verify.mark_damaged_by_size(
        ctx.catalog,
        ctx.run,
        ctx.checkpoint_dir,
        retention.plan(ctx.catalog, ctx.run.id, policy).keep,
        ctx.who,
    ):
        pass
    # one transaction decides (one query) and claims; then the files go (docs/retention.md)
    _hooks.hook("retention.before_claim")
    return cleanup.apply_policy(
        ctx.catalog,
        ctx.run,
        ctx.store,
        policy,
        ctx.who,
        preserve_model=preserve_model,
        fsync=ctx.save_options.fsync,
    )


__all__ = ["apply_retention", "delete_checkpoint"]

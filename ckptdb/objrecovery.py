"""Recovery and deletion for a run on an object store (``s3://``), where nothing is ever renamed.

The filesystem protocols (:mod:`ckptdb.recovery`) reconcile renamed directories; on an object store
every attempt stays under its own prefix ``step_<N>.<token>/`` and the catalog alone says what it
is, so recovery is three catalog-driven passes:

1. a ``pending`` row whose writer is gone is aborted (conditional update), then its prefix removed
   (incomplete multipart uploads aborted, every object deleted);
2. a ``deleting`` row is finished (:func:`finish_delete`);
3. a listed prefix ``step_<N>.<token>/`` whose token belongs to a row of this run that is no longer
   live (``aborted``, ``superseded``, ``deleted`` without a preserved model) is removed: the
   debris of a process that died after its catalog change and before its removal. A prefix whose
   token the catalog does not know, and an imported ``step_<N>/``, are only reported (``foreign``):
   never guessed.

Crash windows: every step is redone by the next recovery. The catalog change comes first, the
removal after (so a crash leaves debris that pass 3 finds, never a committed row without objects).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

from ckptdb import _hooks
from ckptdb.catalog import Catalog, CheckpointInfo, RunInfo
from ckptdb.catalog.models import State
from ckptdb.errors import CheckpointCorruptError
from ckptdb.recovery import RecoveryReport, writer_alive
from ckptdb.storage.store import Store
from ckptdb.storage.writer import FileRecord

log = logging.getLogger("ckptdb")

_GONE = {State.ABORTED.value, State.SUPERSEDED.value, State.DELETED.value}


def recover_object_run(
    catalog: Catalog,
    run: RunInfo,
    store: Store,
    who: tuple[str, int],
    *,
    stale_after: timedelta = timedelta(hours=2),
    dry_run: bool = False,
) -> RecoveryReport:
    """Reconcile one object-store run with its catalog rows (see the module docstring)."""
    rep = RecoveryReport()
    now = catalog.now
    for c in catalog.in_states(run.id, [State.PENDING]):
        if writer_alive(c, stale_after, now):
            rep.live_writers.append(c.step_nr)
            continue
        _hooks.hook("recovery.before_abort")
        if dry_run or catalog.abort(c.id, f"writer {c.writer_host}:{c.writer_pid} died before commit", who):
            rep.rolled_back.append(c.step_nr)
            if not dry_run and store.owner(c.directory) == c.token:
                store.remove_tree(c.directory)
    for c in catalog.in_states(run.id, [State.DELETING]):
        if not dry_run:
            try:
                finish_delete(catalog, c, store, who)
            except CheckpointCorruptError as e:
                rep.unsafe_paths.append(str(e))
                continue
        rep.deletions_finished.append(c.step_nr)
    # the listing first, the catalog's tokens after it: a writer inserts its pending row before its first
    # upload, so every prefix listed here has its row in that read (never taken for foreign)
    names = sorted(store.list_entries())
    rows = catalog.tokens(run.id)
    for name in names:
        token = store.owner(name)
        row = rows.get(token) if token is not None else None
        if row is None:
            if not any(r.directory == name for r in rows.values()):
                rep.foreign.append(name)  # unknown token or an unimported step_<N>/: never guessed
            continue
        if row.state in _GONE and not (row.state == State.DELETED.value and row.model_preserved):
            if not dry_run:
                store.remove_tree(name)
            rep.removed.append(name)
    if rep.changed and not dry_run:
        log.warning("ckptdb recovered run %r: %s", run.name, rep)
    return rep


def finish_delete(catalog: Catalog, c: CheckpointInfo, store: Store, who: tuple[str, int]) -> list[str]:
    """Phases 2 and 3 of a deletion: :func:`ckptdb.recovery.finish_delete`, which works on any Store (on an
    object store the "set aside" is a no-op: the row is marked deleted under the lock and the prefix removed
    after it; a crash in between leaves a prefix whose token names a deleted row, which pass 3 removes)."""
    from ckptdb.recovery import finish_delete as _finish_delete

    return _finish_delete(catalog, c, store, who)


def apply_policy(
    catalog: Catalog,
    run: RunInfo,
    store: Store,
    policy: Any,
    who: tuple[str, int],
    *,
    preserve_model: bool,
    progress: Any = None,
    failed: dict[int, str] | None = None,
) -> list[int]:
    """Retention on an object store: size-check what the policy keeps (HEAD per object; a damaged one is
    marked and does not count as kept), claim in one transaction, then delete each claimed checkpoint."""
    from ckptdb import retention

    while _mark_damaged_by_size(catalog, run, store, retention.plan(catalog, run.id, policy).keep, who):
        pass
    from ckptdb import cleanup

    return cleanup.apply_policy(
        catalog, run, store, policy, who, preserve_model=preserve_model, progress=progress, failed=failed
    )


def gc_object_run(
    catalog: Catalog,
    run: RunInfo,
    store: Store,
    who: tuple[str, int],
    *,
    stale_after: timedelta = timedelta(hours=2),
    dry_run: bool = False,
    remove_unknown: bool = False,
) -> RecoveryReport:
    """``ckptdb gc`` on an object-store run: :func:`recover_object_run`, then

    * committed checkpoints with an object gone are marked ``missing`` (one HEAD per object; never
      while an overwrite or deletion of the step is under way); resized or altered objects are
      ``verify``'s finding, as on a local run;
    * ``missing`` checkpoints whose objects are back and re-hash to the catalog's digests are
      committed again (``healed``);
    * with ``remove_unknown``, prefixes the catalog does not know are removed. The catalog's tokens are
      read AFTER the listing: a writer inserts its pending row before its first upload, so a prefix
      listed before that read whose token is still unknown belongs to no writer of this catalog.
    """
    from ckptdb.verify import _busy, check_object_files

    rep = recover_object_run(catalog, run, store, who, stale_after=stale_after, dry_run=dry_run)
    for c in catalog.in_states(run.id, [State.COMMITTED]):
        try:
            directory = store.check_directory(c.step_nr, c.directory)
        except CheckpointCorruptError as e:  # never followed
            rep.unsafe_paths.append(str(e))
            if not dry_run:
                catalog.mark_damaged(c.id, State.CORRUPT, f"gc: {e}", who)
            continue
        problems, _, _, _ = check_object_files(store, directory, catalog.shards(c.id), digest=False)
        gone = [p.path for p in problems if p.problem == "missing"]
        if not gone or c.step_nr in rep.marked_missing or _busy(catalog, run, c) is not None:
            continue  # resized objects are verify's finding; gc reports what vanished
        _hooks.hook("gc.before_mark_missing")
        if dry_run or catalog.mark_damaged(c.id, State.MISSING, f"gc: objects vanished: {', '.join(gone[:5])}", who):
            rep.marked_missing.append(c.step_nr)
    for c in catalog.in_states(run.id, [State.MISSING]):
        try:
            directory = store.check_directory(c.step_nr, c.directory)
        except CheckpointCorruptError:
            continue
        if not store.exists(directory):
            continue
        problems, _, _, _ = check_object_files(store, directory, catalog.shards(c.id), digest=True)
        if any(p.problem != "extra" for p in problems):
            continue
        if dry_run or catalog.mark_intact(c.id, "gc: every object matches the catalog again", who):
            rep.healed.append(c.step_nr)
    if remove_unknown and rep.foreign:
        listed = set(rep.foreign)
        known = {r.directory for r in catalog.tokens(run.id).values()}
        tokens = set(catalog.tokens(run.id))
        for name in sorted(listed):
            if name in known or store.owner(name) in tokens:
                continue  # a writer that began after the listing: not foreign
            if not dry_run:
                store.remove_tree(name)
            rep.removed.append(name)
    return rep


def _mark_damaged_by_size(
    catalog: Catalog, run: RunInfo, store: Store, steps: Iterable[int], who: tuple[str, int]
) -> list[int]:
    marked: list[int] = []
    for step in steps:
        info = catalog.live(run.id, step)
        if info is None or info.state != State.COMMITTED.value:
            continue
        recs = [
            FileRecord(s.path, s.size_bytes, s.hash_algorithm, s.digest, s.rank, s.kind, s.remote_checksum)
            for s in catalog.shards(info.id)
        ]
        try:
            store.check_files(info.directory, recs, step, digest=False)
        except CheckpointCorruptError as e:
            state = State.MISSING if e.missing else State.CORRUPT
            if catalog.mark_damaged(info.id, state, f"retention size check: {e}"[:2000], who):
                marked.append(step)
    return marked


__all__ = ["apply_policy", "finish_delete", "gc_object_run", "recover_object_run"]

"""Recovery: bring a run's directories back in line with its catalog after a crash.

Run when a manager opens (and by ``ckptdb gc``). Decisions come from catalog rows; the directory
listing is only used to find debris (``step_<N>.tmp-*``, ``.old-*``, ``.trash-*``) whose owner
token (the ``.ckptdb_token`` file each ckptdb directory carries) is then looked up in the catalog.
The full list of crash windows and what this does about each is in docs/architecture.md.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from ckptdb import _hooks, _proc, verify
from ckptdb.catalog import Catalog, CheckpointInfo, RunInfo
from ckptdb.catalog.models import State
from ckptdb.errors import CheckpointCorruptError, ConcurrentModificationError
from ckptdb.storage import checks, layout
from ckptdb.storage.store import LocalStore, Store
from ckptdb.storage.writer import FileRecord, fsync_dir, remove_tree, to_trash

log = logging.getLogger("ckptdb.recovery")

# Tokens of checkpoints that a live manager in *this* process is writing.
_active_tokens: set[str] = set()
_active_lock = threading.Lock()


def hold_token(token: str, owner: object) -> None:
    with _active_lock:
        _active_tokens.add(token)
    weakref.finalize(owner, release_token, token)


def release_token(token: str) -> None:
    with _active_lock:
        _active_tokens.discard(token)


@dataclass
class RecoveryReport:
    rolled_back: list[int] = field(default_factory=list)  # steps whose dead writer's pending row was aborted
    deletions_finished: list[int] = field(default_factory=list)
    restored: list[int] = field(default_factory=list)  # steps whose committed copy was moved back into place
    removed: list[str] = field(default_factory=list)  # debris directories removed
    marked_missing: list[int] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)  # step directories the catalog does not know
    live_writers: list[int] = field(default_factory=list)  # pending steps of live writers (left alone)
    kept: list[str] = field(default_factory=list)  # set-aside copies recovery may not remove (see the log)
    healed: list[int] = field(default_factory=list)  # missing checkpoints whose files are back and verify
    unsafe_paths: list[str] = field(default_factory=list)  # rows whose catalog paths lead outside (never followed)
    unavailable: str | None = None  # the directory is absent / holds none of the committed steps

    @property
    def changed(self) -> bool:
        return bool(
            self.rolled_back
            or self.deletions_finished
            or self.restored
            or self.removed
            or self.marked_missing
            or self.healed
        )


def writer_alive(c: CheckpointInfo, stale_after: timedelta, now_fn: Callable[[], object]) -> bool:
    """Is the process that owns a pending row still running?

    By pid only when the writer ran on this host, this boot and in our pid namespace (all three
    recorded on the row and equal to ours); otherwise (another host, another container on this
    host, a row without the identity columns) by its heartbeat: alive while younger than
    ``stale_after``.
    """
    if _proc.same_pid_space(c.writer_host, c.writer_boot_id, c.writer_pid_ns):
        if c.writer_pid == os.getpid():
            with _active_lock:
                return c.token in _active_tokens
        return _proc.is_alive(c.writer_pid, c.writer_start_time)
    return (now_fn() - c.heartbeat_at) < stale_after  # type: ignore[operator]


def read_owner(d: Path) -> str | None:
    try:
        return (d / layout.TOKEN_FILE).read_text().strip() or None
    except OSError:
        return None


def set_aside_copy(checkpoint_dir: Path, info: CheckpointInfo) -> Path | None:
    """The ``step_<N>.old-<T>`` directory holding ``info``'s copy (an overwrite by T set it aside and
    did not finish), or None. Such a checkpoint is not damaged: recovery moves its copy back."""
    for p in checkpoint_dir.glob(f"{layout.step_dir_name(info.step_nr)}.old-*"):
        wd = layout.parse_work_dir(p.name)
        if wd is None or wd.kind != "old" or not p.is_dir():
            continue
        o = read_owner(p)
        if o == info.token or (o is None and wd.token != info.token):
            return p
    return None


def recover_run(
    catalog: Catalog,
    run: RunInfo,
    checkpoint_dir: Path,
    who: tuple[str, int],
    *,
    stale_after: timedelta = timedelta(hours=2),
    fsync: bool = True,
    remove_foreign: bool = False,
    dry_run: bool = False,
    check_files: bool = False,
) -> RecoveryReport:
    """Reconcile one run's directories with its catalog rows.

    Args:
        remove_foreign: also remove step directories the catalog does not know.
        dry_run: change nothing; the report says what would be done.
        check_files: also look for committed checkpoints whose directory or files vanished and
            mark them ``missing`` (``ckptdb gc``; a manager's open skips this per-file check).
            The caller decides first whether the directory can be judged at all
            (:func:`ckptdb.verify.require_directory`; gc refuses unless forced). Without it, a
            directory that is absent or holds none of the run's committed checkpoints (unmounted)
            is only reported (``unavailable``): nothing in it is judged.
    """
    rep = RecoveryReport()
    now = catalog.now

    # 1. roll back pending rows whose writer is gone (the claim is a conditional update)
    live_pending: set[int] = set()
    for c in catalog.in_states(run.id, [State.PENDING]):
        if writer_alive(c, stale_after, now):
            live_pending.add(c.step_nr)
            rep.live_writers.append(c.step_nr)
            continue
        _hooks.hook("recovery.before_abort")
        if dry_run or catalog.abort(c.id, f"writer {c.writer_host}:{c.writer_pid} died before commit", who):
            rep.rolled_back.append(c.step_nr)

    _hooks.hook("recovery.after_rollback")
    # 2. finish interrupted deletions (idempotent: a racing deleter loses the conditional update)
    for c in catalog.in_states(run.id, [State.DELETING]):
        if not dry_run:
            try:
                finish_delete(catalog, c, checkpoint_dir, who, fsync=fsync)
            except CheckpointCorruptError as e:  # its directory leads elsewhere: left 'deleting', untouched
                rep.unsafe_paths.append(str(e))
                continue
        rep.deletions_finished.append(c.step_nr)

    _hooks.hook("recovery.after_deletions")
    rep.unavailable = verify.directory_unavailable(catalog, run, checkpoint_dir)
    if rep.unavailable is not None and not check_files:
        # unmounted or emptied: nothing here says a checkpoint is gone; judge nothing
        log.warning("ckptdb: %s; no checkpoint is judged missing until it is back", rep.unavailable)
        return rep

    # 3. reconcile directories step by step
    if not checkpoint_dir.is_dir():
        if check_files:
            _check_committed_files(catalog, run, checkpoint_dir, who, rep, dry_run=dry_run)
        return rep
    by_step: dict[int, list[Path]] = {}
    for entry in os.scandir(checkpoint_dir):
        if not entry.is_dir(follow_symlinks=False):
            continue
        p = Path(entry.path)
        wd = layout.parse_work_dir(entry.name)
        if wd is not None:
            if wd.kind == "trash":
                if not dry_run:
                    _hooks.hook("recovery.before_remove_trash")
                    _remove_quietly(p, fsync=fsync)
                rep.removed.append(entry.name)
                continue
            by_step.setdefault(wd.step_nr, []).append(p)
            continue
        step = layout.parse_step_dir(entry.name)
        if step is not None:
            by_step.setdefault(step, []).append(p)

    _hooks.hook("recovery.after_listing")
    for step, dirs in sorted(by_step.items()):
        if step in live_pending:
            continue  # a live writer is mid-protocol on this step: hands off
        _reconcile_step(
            catalog,
            run,
            checkpoint_dir,
            step,
            dirs,
            who,
            rep,
            fsync=fsync,
            remove_foreign=remove_foreign,
            dry_run=dry_run,
            alive=lambda c: writer_alive(c, stale_after, now),
        )
    _hooks.hook("recovery.before_heal")
    _heal_missing(catalog, run, checkpoint_dir, who, rep, dry_run=dry_run)
    if check_files:
        _check_committed_files(catalog, run, checkpoint_dir, who, rep, dry_run=dry_run)
    if rep.changed and not dry_run:
        log.warning("ckptdb recovered run %r: %s", run.name, rep)
    return rep


def _remove_quietly(path: Path, *, fsync: bool) -> None:
    """Remove debris; another process removing the same directory at the same time is fine."""
    try:
        remove_tree(path, fsync=fsync)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("ckptdb: could not remove %s: %s", path, e)


def _check_committed_files(
    catalog: Catalog, run: RunInfo, checkpoint_dir: Path, who: tuple[str, int], rep: RecoveryReport, *, dry_run: bool
) -> None:
    """Mark committed checkpoints whose directory or files are gone as ``missing``.

    A row whose directory or file paths lead outside its step directory is marked ``corrupt``
    (its paths are never followed).
    """
    for c in catalog.in_states(run.id, [State.COMMITTED]):
        try:
            step_dir = layout.step_path(checkpoint_dir, c.step_nr, c.directory)
            gone = [] if step_dir.is_dir() else ["(the step directory)"]
            if not gone:
                gone = [
                    s.path for s in catalog.shards(c.id) if not layout.shard_path(step_dir, s.path, c.step_nr).is_file()
                ]
        except CheckpointCorruptError as e:
            rep.unsafe_paths.append(str(e))
            if not dry_run:
                catalog.mark_damaged(c.id, State.CORRUPT, f"gc: {e}", who)
            continue
        if not gone:
            continue
        if any(checkpoint_dir.glob(f"{layout.step_dir_name(c.step_nr)}.old-*")):
            continue  # an overwrite is between its two renames: not damage
        if c.step_nr in rep.marked_missing:
            continue
        _hooks.hook("gc.before_mark_missing")
        if dry_run:
            rep.marked_missing.append(c.step_nr)
        elif catalog.mark_damaged(c.id, State.MISSING, f"gc: files vanished: {', '.join(gone[:5])}", who):
            rep.marked_missing.append(c.step_nr)


def _verified(catalog: Catalog, checkpoint_dir: Path, keeper: CheckpointInfo) -> bool:
    """Do the keeper's files at ``step_<N>`` match the catalog (sizes and digests)?"""
    step_dir = checkpoint_dir / layout.step_dir_name(keeper.step_nr)
    recs = [FileRecord(x.path, x.size_bytes, x.hash_algorithm, x.digest) for x in catalog.shards(keeper.id)]
    try:
        checks.check_files(step_dir, recs, keeper.step_nr, digest=True)
    except (CheckpointCorruptError, OSError, ValueError) as e:
        log.warning("ckptdb: step %d: the committed copy does not verify (%s)", keeper.step_nr, e)
        return False
    return True


# rows whose existence proves that the overwrite they did was committed once
_ONCE_COMMITTED = {
    State.COMMITTED.value,
    State.SUPERSEDED.value,
    State.DELETING.value,
    State.DELETED.value,
}


def _heal_missing(
    catalog: Catalog, run: RunInfo, checkpoint_dir: Path, who: tuple[str, int], rep: RecoveryReport, *, dry_run: bool
) -> None:
    """``missing`` rows whose files are back (a remount, a restore) and verify become ``committed``.

    Every recorded file must be present with its recorded size and digest (files the catalog does
    not know are ignored, as loads ignore them); the step directory must carry the row's token
    (or none: an imported directory). A row is healed only while it is still its step's live row.
    The move records a ``checkpoint_events`` row. Files present with the right sizes but other
    digests make the row ``corrupt`` (so they are not re-hashed on every open).
    """
    for c in catalog.in_states(run.id, [State.MISSING]):
        live = catalog.live(run.id, c.step_nr)
        if live is None or live.id != c.id:
            continue
        try:
            step_dir = layout.step_path(checkpoint_dir, c.step_nr, c.directory)
        except CheckpointCorruptError:
            continue
        if not step_dir.is_dir() or read_owner(step_dir) not in (None, c.token):
            continue
        shards = catalog.shards(c.id)
        if not shards:
            continue
        sizes, _, _ = verify.check_files(step_dir, shards, digest=False)
        if any(p.problem != "extra" for p in sizes):
            continue  # still gone (or resized): stays missing
        problems = [p for p in verify.check_files(step_dir, shards, digest=True)[0] if p.problem != "extra"]
        _hooks.hook("heal.before_mark")
        if dry_run:
            if not problems:
                rep.healed.append(c.step_nr)
            continue
        if problems:
            bad = "; ".join(p.describe() for p in problems)
            catalog.mark_damaged(c.id, State.CORRUPT, f"recovery: files are back but differ: {bad}"[:2000], who)
        elif catalog.mark_intact(c.id, "recovery: files are back; every size and digest matches the catalog", who):
            catalog.record_verified(c.id, verify.OK)
            rep.healed.append(c.step_nr)


def _reconcile_step(
    catalog: Catalog,
    run: RunInfo,
    checkpoint_dir: Path,
    step: int,
    dirs: list[Path],
    who: tuple[str, int],
    rep: RecoveryReport,
    *,
    fsync: bool,
    remove_foreign: bool,
    dry_run: bool = False,
    alive: Callable[[CheckpointInfo], bool],
) -> None:
    """Bring one step's directories in line with its rows.

    Decided and done under the run's lock (:meth:`Catalog.run_lock`), from rows and owner tokens
    read afresh there: a commit publishes under the same lock, so nothing it does can fall between
    what this reads and what it does. Destructive acts are renames to ``step_<N>.trash-*``; the
    trash is removed after the lock is released. Verifying a committed copy (hashing) happens
    before the lock and counts only if the same row still holds the step under it.
    """
    final = checkpoint_dir / layout.step_dir_name(step)
    if dirs == [final]:  # the common case: a committed step_N in place, nothing to do (no lock needed)
        keeper = catalog.live(run.id, step)
        o = read_owner(final)
        if keeper is not None and o is not None and o == keeper.token:
            return
    verified_id: int | None = None
    if any(d.name.startswith(f"{final.name}.old-") for d in dirs):
        pre = catalog.live(run.id, step)  # an .old copy is removed only once its replacement verifies
        if pre is not None and pre.state == State.COMMITTED.value and final.is_dir():
            if _verified(catalog, checkpoint_dir, pre):
                verified_id = pre.id
    trash: list[Path] = []
    _hooks.hook("reconcile.before_lock")
    with catalog.run_lock(run.id):
        _hooks.hook("reconcile.locked")
        _reconcile_locked(
            catalog,
            run,
            checkpoint_dir,
            step,
            dirs,
            who,
            rep,
            trash,
            fsync=fsync,
            remove_foreign=remove_foreign,
            dry_run=dry_run,
            alive=alive,
            verified_id=verified_id,
        )
    _hooks.hook("reconcile.before_rmtree")
    for t in trash:
        _remove_quietly(t, fsync=fsync)


def _reconcile_locked(
    catalog: Catalog,
    run: RunInfo,
    checkpoint_dir: Path,
    step: int,
    dirs: list[Path],
    who: tuple[str, int],
    rep: RecoveryReport,
    trash: list[Path],
    *,
    fsync: bool,
    remove_foreign: bool,
    dry_run: bool,
    alive: Callable[[CheckpointInfo], bool],
    verified_id: int | None,
) -> None:
    final = checkpoint_dir / layout.step_dir_name(step)
    for c in catalog.checkpoints(run.id, states=[State.PENDING.value], step_nr=step, with_scores=False):
        if alive(c) or not dry_run:
            return  # a writer began on this step since recovery looked: hands off
    # what is there now (the listing may be stale): the listed work directories + step_N
    present = [d for d in dirs if d != final and d.is_dir()]
    if final.is_dir():
        present.insert(0, final)
    if not present:
        keeper = catalog.live(run.id, step)
        if keeper is not None and keeper.state == State.COMMITTED.value and not dry_run:
            if catalog.mark_damaged(keeper.id, State.MISSING, "recovery: step directory is gone", who):
                rep.marked_missing.append(step)
        return
    work = {d: layout.parse_work_dir(d.name) for d in present}
    owner: dict[Path, str | None] = {}
    for d in present:
        o = read_owner(d)
        wd = work[d]
        if wd is not None and wd.kind == "tmp" and o != wd.token:
            # a writer creates step_N.tmp-<token>/ before it writes the token file, and a power loss
            # before that file's fsync leaves it absent, empty or torn: trust the name (only that
            # writer makes it)
            o = wd.token
        owner[d] = o
    olds = {d: wd.token for d, wd in work.items() if wd is not None and wd.kind == "old"}
    rows = catalog.by_tokens([t for t in [*owner.values(), *olds.values()] if t])
    if final in owner and owner[final] is None and olds:
        # step_N beside step_N.old-<T>: only T's publish (the rename after the one that made .old-T)
        # can have put it there, so it is T's copy whose token file a power loss took
        named = [rows[t] for t in olds.values() if t in rows and rows[t].run_id == run.id]
        if named:
            owner[final] = max(named, key=lambda r: r.id).token
    keeper = catalog.live(run.id, step)
    if keeper is not None and keeper.state == State.DELETING.value:
        return  # finish_delete's
    if keeper is None:
        keeper = catalog.preserved_model(run.id, step)

    def keepers(d: Path) -> bool:
        if keeper is None:
            return False
        if owner[d] is not None:
            return owner[d] == keeper.token
        if d == final:
            return True  # an adopted (imported) step_N carries no token file
        # a tokenless step_N.old-<T> is the copy T set aside: the keeper's unless T is the keeper
        return d in olds and olds[d] != keeper.token

    def mine(d: Path) -> bool:
        o = owner[d]
        return o is None or o not in rows or rows[o].run_id == run.id

    present = [d for d in present if mine(d)]  # another run's directories are never ours to touch
    keeper_dir = final if final in present and keepers(final) else next((d for d in present if keepers(d)), None)
    if keeper is not None and keeper_dir is not None and keeper_dir != final:
        # the keeper's copy is set aside (an overwrite did not commit): move it back into place
        if final in present:
            o = owner[final]
            row = rows.get(o) if o else None
            if row is None or row.run_id != run.id or row.id == keeper.id:
                rep.foreign.append(final.name)  # not a copy this catalog can judge: leave the step alone
                return
            rep.removed.append(final.name)
            if not dry_run:
                trash.append(to_trash(final, step, fsync=False))
        rep.restored.append(step)
        if dry_run:
            return
        _hooks.hook("reconcile.before_restore")
        keeper_dir.rename(final)
        if fsync:
            fsync_dir(checkpoint_dir)
        present = [final if d == keeper_dir else d for d in present if d != final]
        owner[final] = keeper.token
        keeper_dir = final
    elif keeper is not None and keeper_dir is None and final not in present and keeper.state == State.COMMITTED.value:
        if dry_run or catalog.mark_damaged(keeper.id, State.MISSING, "recovery: step directory is gone", who):
            rep.marked_missing.append(step)

    for d in present:
        if d == keeper_dir:
            continue
        o = owner[d]
        if d in olds:
            # a copy set aside by the overwrite of token T: removed only when T's row says that
            # overwrite committed and (T still holding the step) its files verify; else kept
            t_row = rows.get(olds[d] or "")
            o_row = rows.get(o) if o else None
            if t_row is not None and t_row.state in _ONCE_COMMITTED and t_row.run_id == run.id:
                holds = keeper is not None and t_row.id == keeper.id
                replacement_ok = keeper_dir == final and verified_id == t_row.id and t_row.state == "committed"
                if not holds or replacement_ok:
                    rep.removed.append(d.name)
                    if not dry_run:
                        trash.append(to_trash(d, step, fsync=fsync))
                    continue
            elif o_row is not None and o_row.state == State.DELETED.value and not o_row.model_preserved:
                rep.removed.append(d.name)  # its own row was deleted: the user asked for it to go
                if not dry_run:
                    trash.append(to_trash(d, step, fsync=fsync))
                continue
            log.warning("ckptdb: keeping %s: recovery cannot prove it is safe to remove", d)
            rep.kept.append(d.name)
            continue
        if o is None or o not in rows:
            # no token (a user's directory, fairseq2's own `step_N.tmp`) or another catalog's
            rep.foreign.append(d.name)
            if remove_foreign:
                rep.removed.append(d.name)
                if not dry_run:
                    trash.append(to_trash(d, step, fsync=fsync))
            continue
        if rows[o].state == State.PENDING.value and alive(rows[o]):
            continue  # pending of a writer judged alive elsewhere: never touch
        if rows[o].state in (State.COMMITTED.value, State.CORRUPT.value, State.MISSING.value):
            continue  # a live row's copy (not this step's keeper: never ours to remove)
        _hooks.hook("reconcile.before_trash_debris")
        rep.removed.append(d.name)
        if not dry_run:
            trash.append(to_trash(d, step, fsync=fsync))


def finish_delete(
    catalog: Catalog, c: CheckpointInfo, where: Store | Path, who: tuple[str, int], *, fsync: bool = True
) -> list[str]:
    """Phase 2 and 3 of a deletion: remove the files, then mark the row deleted.

    Under the run's lock, the row is re-read (it must still be ``deleting``) and the directory's
    owner token checked just before the directory is set aside (local: renamed to trash; or, with
    ``model_preserved``, its non-model files unlinked) and the row marked deleted; what was set
    aside is removed after the lock is released. ``where``: the run's store (a local checkpoint
    directory is wrapped in a :class:`~ckptdb.storage.store.LocalStore`).

    Raises:
        CheckpointCorruptError: the row's directory is not its step's ``step_<N>`` (a tampered
            catalog): nothing is removed, the row stays as it is.
    """
    store = where if isinstance(where, Store) else LocalStore(where, fsync=fsync)
    directory = store.check_directory(c.step_nr, c.directory)
    kept: list[str] = []
    handle: str | None = None
    with catalog.run_lock(c.run_id):
        now = catalog.by_tokens([c.token]).get(c.token)
        _hooks.hook("finish_delete.locked")
        if now is None or now.state != State.DELETING.value:
            return []  # finished by another process, or superseded by a commit: not ours any more
        target: str | None = None
        if store.isdir(directory):
            owner = store.owner(directory)
            if owner == c.token or (owner is None and _set_aside_in(store, c) is None):
                target = directory
        aside = _set_aside_in(store, c) if target is None else None
        if aside is not None and store.owner(aside) == c.token:
            target = aside  # its copy was set aside by an overwrite that did not commit
        if target is not None:
            if now.model_preserved and target == directory:
                kept = [s.path for s in catalog.shards(c.id) if layout.kept_with_model(s.path)]
                store.remove_files(directory, set(kept))
            else:
                handle = store.set_aside(target, c.step_nr)
                _hooks.hook("finish_delete.after_trash")
        try:
            catalog.mark_deleted(c.id, who, kept_paths=kept)
        except ConcurrentModificationError:
            pass  # another process finished it first
    if handle is not None:
        _hooks.hook("finish_delete.before_rmtree")
        store.remove(handle)
    return kept


def _set_aside_in(store: Store, info: CheckpointInfo) -> str | None:
    """:func:`set_aside_copy` in a store: the ``step_<N>.old-<T>`` holding ``info``'s copy (local stores
    only: an object store never sets a copy aside)."""
    root = store.local_root
    if root is None:
        return None
    p = set_aside_copy(root, info)
    return None if p is None else p.name

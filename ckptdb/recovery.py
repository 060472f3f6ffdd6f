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

from ckptdb import _proc, verify
from ckptdb.catalog import Catalog, CheckpointInfo, RunInfo
from ckptdb.catalog.models import State
from ckptdb.errors import CheckpointCorruptError, ConcurrentModificationError
from ckptdb.storage import layout
from ckptdb.storage.writer import fsync_dir, remove_tree

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
    """Is the process that owns a pending row still running?"""
    if c.writer_host == _proc.hostname() and c.writer_pid == os.getpid():
        with _active_lock:
            return c.token in _active_tokens
    alive = _proc.is_alive(c.writer_host, c.writer_pid, c.writer_start_time)
    if alive is not None:
        return alive
    # another host: trust its heartbeat for stale_after
    return (now_fn() - c.heartbeat_at) < stale_after  # type: ignore[operator]


def read_owner(d: Path) -> str | None:
    try:
        return (d / layout.TOKEN_FILE).read_text().strip() or None
    except OSError:
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
        elif dry_run or catalog.abort(c.id, f"writer {c.writer_host}:{c.writer_pid} died before commit", who):
            rep.rolled_back.append(c.step_nr)

    # 2. finish interrupted deletions (idempotent: a racing deleter loses the conditional update)
    for c in catalog.in_states(run.id, [State.DELETING]):
        if not dry_run:
            try:
                finish_delete(catalog, c, checkpoint_dir, who, fsync=fsync)
            except CheckpointCorruptError as e:  # its directory leads elsewhere: left 'deleting', untouched
                rep.unsafe_paths.append(str(e))
                continue
        rep.deletions_finished.append(c.step_nr)

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
    named: dict[Path, str | None] = {}  # the token in a work directory's name
    for entry in os.scandir(checkpoint_dir):
        if not entry.is_dir(follow_symlinks=False):
            continue
        p = Path(entry.path)
        wd = layout.parse_work_dir(entry.name)
        if wd is not None:
            if wd.kind == "trash":
                if not dry_run:
                    _remove_quietly(p, fsync=fsync)
                rep.removed.append(entry.name)
                continue
            by_step.setdefault(wd.step_nr, []).append(p)
            named[p] = wd.token
            continue
        step = layout.parse_step_dir(entry.name)
        if step is not None:
            by_step.setdefault(step, []).append(p)

    # a writer creates step_N.tmp-<token>/ before it writes the token file inside: trust the name
    owners = {p: read_owner(p) or named.get(p) for ps in by_step.values() for p in ps}
    rows = catalog.by_tokens(t for t in owners.values() if t)
    for step, dirs in sorted(by_step.items()):
        if step in live_pending:
            continue  # a live writer is mid-protocol on this step: hands off
        _reconcile_step(
            catalog,
            run,
            checkpoint_dir,
            step,
            dirs,
            owners,
            rows,
            who,
            rep,
            fsync=fsync,
            remove_foreign=remove_foreign,
            dry_run=dry_run,
        )
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
        if dry_run:
            rep.marked_missing.append(c.step_nr)
        elif catalog.mark_damaged(c.id, State.MISSING, f"gc: files vanished: {', '.join(gone[:5])}", who):
            rep.marked_missing.append(c.step_nr)


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
    owners: dict[Path, str | None],
    rows: dict[str, CheckpointInfo],
    who: tuple[str, int],
    rep: RecoveryReport,
    *,
    fsync: bool,
    remove_foreign: bool,
    dry_run: bool = False,
) -> None:
    final = checkpoint_dir / layout.step_dir_name(step)
    # directories owned by another run's rows are never ours to touch
    mine = [
        d
        for d in dirs
        if owners[d] is None or rows.get(owners[d] or "") is None or rows[owners[d] or ""].run_id == run.id
    ]
    keeper = catalog.live(run.id, step)
    if keeper is not None and keeper.state == State.DELETING.value:
        return
    if keeper is None:
        keeper = catalog.preserved_model(run.id, step)

    def owned_by_keeper(d: Path) -> bool:
        if keeper is None:
            return False
        o = owners[d]
        return o == keeper.token or (o is None and d == final and layout.parse_step_dir(d.name) is not None)

    keeper_dir = next((d for d in mine if d == final and owned_by_keeper(d)), None)
    if keeper_dir is None and keeper is not None:
        keeper_dir = next((d for d in mine if owned_by_keeper(d)), None)
        if keeper_dir is not None:
            if not keeper_dir.is_dir():
                return  # renamed since the scan (a commit finishing): the listing is stale, leave the step
            if final.exists():
                o = owners.get(final) or read_owner(final)
                if o == keeper.token:
                    return  # the keeper reached its place since the scan
                if o is not None and o in rows and rows[o].run_id == run.id:
                    if not dry_run:
                        remove_tree(final, fsync=fsync)
                    rep.removed.append(final.name)
                else:
                    rep.foreign.append(final.name)
                    return
            rep.restored.append(step)
            if dry_run:
                return
            keeper_dir.rename(final)
            if fsync:
                fsync_dir(checkpoint_dir)
            mine = [final if d == keeper_dir else d for d in mine]
            owners[final] = keeper.token
            keeper_dir = final
        elif not final.exists() and keeper.state == State.COMMITTED.value:
            if dry_run or catalog.mark_damaged(keeper.id, State.MISSING, "recovery: step directory is gone", who):
                rep.marked_missing.append(step)

    for d in mine:
        if d == keeper_dir:
            continue
        o = owners[d]
        if o is None:
            # no token seen: look again; a directory renamed away meanwhile (a concurrent
            # deletion or commit) is not ours to judge
            o = read_owner(d)
            if o is None and not d.is_dir():
                continue
        if o is None:
            # no token: a directory ckptdb did not write (a user's, or fairseq2's own `step_N.tmp`)
            rep.foreign.append(d.name)
            if remove_foreign:
                if not dry_run:
                    _remove_quietly(d, fsync=fsync)
                rep.removed.append(d.name)
            continue
        if o not in rows:
            rep.foreign.append(d.name)  # written by another catalog: leave it unless asked
            if remove_foreign:
                if not dry_run:
                    _remove_quietly(d, fsync=fsync)
                rep.removed.append(d.name)
            continue
        row = rows.get(o or "")
        if row is not None and row.state == State.PENDING.value:
            continue  # pending of a writer judged alive elsewhere: never touch
        rep.removed.append(d.name)
        if not dry_run:
            _remove_quietly(d, fsync=fsync)


def finish_delete(
    catalog: Catalog, c: CheckpointInfo, checkpoint_dir: Path, who: tuple[str, int], *, fsync: bool = True
) -> list[str]:
    """Phase 2 and 3 of a deletion: remove the files, then mark the row deleted.

    Raises:
        CheckpointCorruptError: the row's directory is not its step's ``step_<N>`` (a tampered
            catalog): nothing is removed, the row stays as it is.
    """
    step_dir = layout.step_path(checkpoint_dir, c.step_nr, c.directory)
    kept: list[str] = []
    owner = read_owner(step_dir) if step_dir.exists() else None
    if step_dir.exists() and owner not in (None, c.token):
        step_dir = None  # type: ignore[assignment]  # someone else's copy now lives there: not ours
    if c.model_preserved and step_dir is not None and step_dir.is_dir():
        kept = [s.path for s in catalog.shards(c.id) if layout.is_model_file(s.path)]
    try:
        _remove_files(c, step_dir, kept, fsync=fsync)
    except FileNotFoundError:
        pass  # a concurrent finisher (gc, a reopened manager) got there first
    try:
        catalog.mark_deleted(c.id, who, kept_paths=kept)
    except ConcurrentModificationError:
        pass  # another process finished it first
    return kept


def _remove_files(c: CheckpointInfo, step_dir: Path | None, kept: list[str], *, fsync: bool) -> None:
    if step_dir is not None and step_dir.exists():
        if c.model_preserved:
            for entry in sorted(step_dir.rglob("*"), reverse=True):
                rel = entry.relative_to(step_dir).as_posix()
                if rel in kept or rel == layout.TOKEN_FILE:
                    continue
                if entry.is_dir():
                    try:
                        entry.rmdir()
                    except OSError:
                        pass
                else:
                    entry.unlink(missing_ok=True)
            if fsync:
                fsync_dir(step_dir)
        else:
            remove_tree(step_dir, fsync=fsync)

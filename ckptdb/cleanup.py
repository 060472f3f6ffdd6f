"""Prune and gc: retention and debris cleanup over the catalog (``ckptdb prune`` / ``ckptdb gc``).

Deleting by a policy is the two-phase deletion of docs/architecture.md, with the decision made
inside the claim:

1. one transaction decides and claims: ``UPDATE checkpoints SET state = 'deleting' WHERE id IN
   (<the policy's decision query>) AND state = 'committed'`` under the run's write lock (SQLite:
   ``BEGIN IMMEDIATE``; PostgreSQL: ``SELECT ... FOR NO KEY UPDATE`` on the run row, which ``pin``
   takes too), recording ``delete_reason`` and one ``checkpoint_events`` row per checkpoint;
2. the files are removed (``preserve_model=True`` keeps ``model*.pt`` and ``score.txt``);
3. each row moves ``deleting -> deleted`` (a conditional update: exactly one finisher wins).

Model-only leftovers of earlier ``preserve_model=True`` deletions are candidates too (fairseq2
counts their directories as steps): one the policy drops moves ``deleted -> deleting`` in the
same claim (unless this deletion preserves models as well) and its model files go by 2 and 3.

A process that dies between 1 and 3 leaves ``deleting`` rows; ``gc`` (or the next manager open)
finishes them. Two prunes never delete the same checkpoint: the second one's decision no longer
sees the first one's claimed rows as committed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from ckptdb import _hooks, _proc
from ckptdb.catalog import Catalog, RunInfo
from ckptdb.errors import CheckpointDirUnavailableError, CheckpointError
from ckptdb.recovery import RecoveryReport, finish_delete, recover_run
from ckptdb.retention import Plan, Policy, deletion_reason
from ckptdb.runstore import is_object_run, run_store
from ckptdb.storage.store import Store
from ckptdb.verify import require_directory

log = logging.getLogger("ckptdb.cleanup")

Progress = Callable[[int, int, str], None]  # (done, total, what)


def who_am_i() -> tuple[str, int]:
    return _proc.hostname(), os.getpid()


@dataclass
class PruneReport:
    run: str
    policy: str
    plan: Plan  # the decision as first computed (what `--dry-run` prints)
    deleted: list[int] = field(default_factory=list)  # steps this prune deleted
    failed: dict[int, str] = field(default_factory=dict)  # step -> error (left 'deleting' for gc)
    dry_run: bool = False
    preserve_model: bool = False

    @property
    def to_delete(self) -> list[int]:
        """The steps whose files the plan removes (with preserve_model, model-only ones stay as they are)."""
        return self.plan.deletes(preserve_model=self.preserve_model)

    @property
    def ok(self) -> bool:
        return not self.failed


def apply_policy(
    catalog: Catalog,
    run: RunInfo,
    checkpoint_dir: Path | Store,
    policy: Policy,
    who: tuple[str, int],
    *,
    preserve_model: bool = False,
    fsync: bool = True,
    progress: Progress | None = None,
    failed: dict[int, str] | None = None,
) -> list[int]:
    """Delete what ``policy`` does not keep; returns the steps whose files were removed (ascending),
    model-only leftovers whose model files went included.

    ``checkpoint_dir``: the run's store, or its local checkpoint directory.
    Checkpoints whose files could not be removed stay ``deleting`` (``gc`` finishes them) and
    are reported in ``failed`` when given.
    """
    claimed = catalog.claim_for_deletion(
        run.id, policy.components(), deletion_reason(policy), who, preserve_model=preserve_model
    )
    _hooks.hook("retention.after_claim")
    deleted: list[int] = []
    for i, c in enumerate(claimed, 1):
        try:
            finish_delete(catalog, c, checkpoint_dir, who, fsync=fsync)
            deleted.append(c.step_nr)
            _hooks.hook("retention.after_finish")
        except (OSError, CheckpointError) as e:
            log.warning("ckptdb: step %d of run %r stays 'deleting' (gc finishes it): %s", c.step_nr, run.name, e)
            if failed is not None:
                failed[c.step_nr] = str(e)
        if progress is not None:
            progress(i, len(claimed), f"step {c.step_nr}")
    return deleted


def prune(
    catalog: Catalog,
    run_name: str,
    policy: Policy,
    *,
    dry_run: bool = False,
    preserve_model: bool = False,
    fsync: bool = True,
    progress: Progress | None = None,
) -> PruneReport:
    """Decide with ``policy`` (one query) and, unless ``dry_run``, delete what it does not keep."""
    run = catalog.get_run(run_name)
    rep = PruneReport(
        run.name,
        str(policy),
        catalog.retention_plan(run.id, policy.components()),
        dry_run=dry_run,
        preserve_model=preserve_model,
    )
    if dry_run or not rep.to_delete:
        return rep
    if is_object_run(run.checkpoint_dir):
        from ckptdb import objrecovery

        rep.deleted = objrecovery.apply_policy(
            catalog,
            run,
            run_store(run.checkpoint_dir),
            policy,
            who_am_i(),
            preserve_model=preserve_model,
            progress=progress,
            failed=rep.failed,
        )
        return rep
    rep.deleted = apply_policy(
        catalog,
        run,
        Path(run.checkpoint_dir),
        policy,
        who_am_i(),
        preserve_model=preserve_model,
        fsync=fsync,
        progress=progress,
        failed=rep.failed,
    )
    return rep


@dataclass
class GcReport:
    runs: dict[str, RecoveryReport] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # run -> error
    refused: dict[str, str] = field(default_factory=dict)  # run -> why (directory absent / empty): untouched
    dry_run: bool = False

    def total(self, attr: str) -> int:
        return sum(len(getattr(r, attr)) for r in self.runs.values())

    @property
    def ok(self) -> bool:
        return (
            not self.errors
            and not self.refused
            and self.total("marked_missing") == 0
            and self.total("unsafe_paths") == 0
        )


def gc(
    catalog: Catalog,
    run_names: Sequence[str] | None = None,
    *,
    dry_run: bool = False,
    remove_unknown: bool = False,
    stale_after: timedelta = timedelta(hours=2),
    fsync: bool = True,
    progress: Progress | None = None,
    force: bool = False,
) -> GcReport:
    """Finish interrupted deletions, remove dead writers' temporary directories, mark committed
    checkpoints whose files vanished ``missing``, and list (with ``remove_unknown``: remove) step
    directories the catalog does not know; for ``run_names`` or every run of the catalog.

    A pending checkpoint whose writer is alive (same host, boot and pid namespace: its pid and
    start time; another host or container: a heartbeat younger than ``stale_after``) is never touched.
    A run whose directory is absent, or holds none of its committed checkpoints (an unmounted
    filesystem, an empty mount point), is refused and left untouched (``refused``), unless
    ``force``: gc never marks every checkpoint ``missing`` on that evidence.
    """
    names = list(run_names) if run_names else [r["run"] for r in catalog.list_runs()]
    rep = GcReport(dry_run=dry_run)
    who = who_am_i()
    for i, name in enumerate(names, 1):
        try:
            run = catalog.get_run(name)
            if is_object_run(run.checkpoint_dir):
                from ckptdb import objrecovery

                store = run_store(run.checkpoint_dir)
                if not force:
                    require_directory(catalog, run, store)
                rep.runs[name] = objrecovery.gc_object_run(
                    catalog,
                    run,
                    store,
                    who,
                    stale_after=stale_after,
                    dry_run=dry_run,
                    remove_unknown=remove_unknown,
                )
            else:
                if not force:
                    require_directory(catalog, run, Path(run.checkpoint_dir))
                rep.runs[name] = recover_run(
                    catalog,
                    run,
                    Path(run.checkpoint_dir),
                    who,
                    stale_after=stale_after,
                    fsync=fsync,
                    remove_foreign=remove_unknown,
                    dry_run=dry_run,
                    check_files=True,
                )
        except CheckpointDirUnavailableError as e:
            rep.refused[name] = str(e)
        except OSError as e:  # EIO, ENOSPC...: recovery is redone by the next gc (or open)
            rep.errors[name] = f"recovery failed ({e}); nothing committed was lost; run gc again to finish it"
        except CheckpointError as e:
            rep.errors[name] = str(e)
        if progress is not None:
            progress(i, len(names), name)
    return rep


__all__ = ["GcReport", "PruneReport", "apply_policy", "gc", "prune"]

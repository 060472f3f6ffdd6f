"""Catalog operations: every read and write the rest of ckptdb makes, each one transaction.

State moves are conditional updates (``UPDATE ... WHERE state = <expected>``): when two
processes race for the same row (a trainer committing, a ``gc`` rolling back a writer it thinks
is dead) exactly one wins and the other gets :class:`ConcurrentModificationError`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from sqlalchemy import func, insert, or_, select, text, update
from sqlalchemy.orm import Session

from ckptdb.catalog import migrate, retention_sql
from ckptdb.catalog.models import (
    LIVE_STATES,
    Checkpoint,
    CheckpointEvent,
    Pin,
    Run,
    Score,
    Shard,
    State,
    utcnow,
)
from ckptdb.catalog.session import CatalogSession, masked
from ckptdb.catalog.values import CheckpointInfo, RunInfo, SaveTimings, ShardInfo, WriterInfo
from ckptdb.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    ConcurrentModificationError,
    InvalidArgumentError,
    InvalidOperationError,
)

_LIVE = [s.value for s in LIVE_STATES]
_DAMAGED = (State.CORRUPT, State.MISSING)


def _begin_rows(s: Session, run_id: int, step_nr: int) -> list[Checkpoint]:
    """The pending writer and the live copy of ``step_nr``, if any (one round trip)."""
    return list(
        s.execute(
            select(Checkpoint).where(
                Checkpoint.run_id == run_id,
                Checkpoint.step_nr == step_nr,
                Checkpoint.state.in_([State.PENDING.value, *_LIVE]),
            )
        )
        .scalars()
        .all()
    )


def _refuse_begin(rows: list[Checkpoint], step_nr: int, overwrite: bool) -> None:
    pending = next((r for r in rows if State(r.state) == State.PENDING), None)
    if pending is not None:
        raise InvalidOperationError(
            f"step {step_nr} is already being written by {pending.writer_host} pid {pending.writer_pid}"
        )
    live = next((r for r in rows if State(r.state).value in _LIVE), None)
    # a damaged copy (corrupt, missing) does not block saving the step again: the new
    # commit supersedes it (its files are set aside until then, as for an overwrite)
    if live is not None and not overwrite and State(live.state) not in _DAMAGED:
        raise CheckpointExistsError(
            f"step {step_nr} already has a {State(live.state).value} checkpoint; pass "
            "overwrite=True to replace it (the old copy is kept until the new one commits)",
            step_nr=step_nr,
        )
    if live is not None and State(live.state) == State.DELETING:
        raise InvalidOperationError(f"step {step_nr} is being deleted; retry after it finishes")


def _score_columns(value: float) -> tuple[float | None, str]:
    raw = repr(float(value))
    return (float(value) if math.isfinite(value) else None), raw


def _writer_columns(writer: WriterInfo) -> dict[str, Any]:
    """The ``checkpoints`` columns that record who wrote a checkpoint (reproducibility, liveness)."""
    return {
        "writer_host": writer.host,
        "writer_pid": writer.pid,
        "writer_start_time": writer.start_time,
        "writer_boot_id": writer.boot_id,
        "writer_pid_ns": writer.pid_ns,
        "ckptdb_version": writer.ckptdb_version,
        "torch_version": writer.torch_version,
        "python_version": writer.python_version,
        "world_size": writer.world_size,
    }


def _run_info(r: Run) -> RunInfo:
    return RunInfo(r.id, r.name, r.checkpoint_dir, r.created_at, r.model_metadata)


def _ckpt_info(c: Checkpoint, scores: Mapping[str, float | None] | None = None) -> CheckpointInfo:
    return CheckpointInfo(
        id=c.id,
        run_id=c.run_id,
        step_nr=c.step_nr,
        state=State(c.state).value,
        token=c.token,
        directory=c.directory,
        created_at=c.created_at,
        committed_at=c.committed_at,
        writer_host=c.writer_host,
        writer_pid=c.writer_pid,
        writer_start_time=c.writer_start_time,
        heartbeat_at=c.heartbeat_at,
        world_size=c.world_size,
        hash_algorithm=c.hash_algorithm,
        total_bytes=c.total_bytes,
        file_count=c.file_count,
        model_preserved=c.model_preserved,
        deleted_at=c.deleted_at,
        delete_reason=c.delete_reason,
        verified_at=c.verified_at,
        verify_result=c.verify_result,
        ckptdb_version=c.ckptdb_version,
        torch_version=c.torch_version,
        user_metadata=c.user_metadata,
        scores=dict(scores or {}),
        stage_seconds=c.stage_seconds,
        write_seconds=c.write_seconds,
        sync_seconds=c.sync_seconds,
        commit_seconds=c.commit_seconds,
        writer_boot_id=c.writer_boot_id,
        writer_pid_ns=c.writer_pid_ns,
    )


class Catalog:
    """One catalog database. ``Catalog(url)`` creates a new database's schema, refuses an old one."""

    def __init__(self, url: str, *, create: bool = True) -> None:
        self.url = url
        self.db = CatalogSession(url)
        migrate.ensure_schema(url, create=create)

    def __repr__(self) -> str:
        return f"Catalog({masked(self.url)!r})"

    # -- events -------------------------------------------------------------------------------

    @staticmethod
    def _event(s: Session, ckpt_id: int, frm: str | None, to: str, reason: str | None, writer: tuple[str, int]) -> None:
        s.add(
            CheckpointEvent(
                checkpoint_id=ckpt_id,
                from_state=frm,
                to_state=to,
                reason=reason,
                host=writer[0],
                pid=writer[1],
            )
        )

    @staticmethod
    def _move(
        s: Session,
        ckpt_id: int,
        frm: State | Sequence[State],
        to: State,
        *,
        reason: str | None,
        who: tuple[str, int],
        **values: Any,
    ) -> str:
        """Conditionally move a row between states; returns the state it left."""
        frms = [frm] if isinstance(frm, State) else list(frm)
        row = s.execute(select(Checkpoint.state).where(Checkpoint.id == ckpt_id)).scalar_one_or_none()
        if row is None or State(row) not in frms:
            raise ConcurrentModificationError(
                f"checkpoint #{ckpt_id} is {State(row).value if row else 'gone'}, "
                f"expected {'/'.join(f.value for f in frms)}: another process changed it"
            )
        now = utcnow()
        res = s.execute(
            update(Checkpoint)
            .where(Checkpoint.id == ckpt_id, Checkpoint.state == State(row))
            .values(state=to, state_changed_at=now, **values)
            .execution_options(synchronize_session=False)
        )
        if res.rowcount != 1:  # type: ignore[attr-defined]
            raise ConcurrentModificationError(f"checkpoint #{ckpt_id} changed under us")
        Catalog._event(s, ckpt_id, State(row).value, to.value, reason, who)
        return State(row).value

    # -- the run lock -------------------------------------------------------------------------

    @contextmanager
    def run_lock(self, run_id: int) -> Iterator[None]:
        """Hold the run's write lock for the block: one transaction that every call of this catalog
        in this thread joins (committed at the end of the block, rolled back on error).

        SQLite: ``BEGIN IMMEDIATE`` (the database's write lock); PostgreSQL: ``SELECT ... FOR NO KEY
        UPDATE`` on the run row. A commit's publish (the renames + the catalog commit) and every
        destructive step of recovery, gc and delete run inside it, after re-reading the rows they act
        for, so one never acts on what the other has changed since it looked (docs/architecture.md).
        Keep the block short: filesystem renames and catalog statements only, never an ``rmtree``.
        """
        with self.db.held() as s:
            s.execute(select(Run.id).where(Run.id == run_id))  # SQLite: starts BEGIN IMMEDIATE
            self._lock_run(s, run_id)
            yield

    # -- runs ---------------------------------------------------------------------------------

    def ensure_run(self, name: str, checkpoint_dir: str) -> RunInfo:
        try:
            return self._ensure_run(name, checkpoint_dir)
        except ConcurrentModificationError:
            return self._ensure_run(name, checkpoint_dir)  # another process created it first

    def _ensure_run(self, name: str, checkpoint_dir: str) -> RunInfo:
        with self.db.transaction() as s:
            run = s.execute(select(Run).where(Run.name == name)).scalar_one_or_none()
            if run is None:
                run = Run(name=name, checkpoint_dir=checkpoint_dir)
                s.add(run)
                s.flush()
            elif run.checkpoint_dir != checkpoint_dir:
                raise InvalidArgumentError(
                    f"run {name!r} already exists in this catalog with checkpoint_dir "
                    f"{run.checkpoint_dir!r}, not {checkpoint_dir!r}; pass run= to name a different run"
                )
            return _run_info(run)

    def get_run(self, name: str) -> RunInfo:
        with self.db.transaction(readonly=True) as s:
            run = s.execute(select(Run).where(Run.name == name)).scalar_one_or_none()
            if run is None:
                raise CheckpointNotFoundError(f"no run named {name!r} in catalog {masked(self.url)}")
            return _run_info(run)

    def list_runs(self) -> list[dict[str, Any]]:
        """One summary row per run: committed count, newest committed step, bytes."""
        live = (
            select(
                Checkpoint.run_id,
                func.count().label("committed"),
                func.max(Checkpoint.step_nr).label("last_step"),
                func.coalesce(func.sum(Checkpoint.total_bytes), 0).label("bytes"),
            )
            .where(Checkpoint.state == State.COMMITTED)
            .group_by(Checkpoint.run_id)
            .subquery()
        )
        q = (
            select(Run, live.c.committed, live.c.last_step, live.c.bytes)
            .outerjoin(live, live.c.run_id == Run.id)
            .order_by(Run.name)
        )
        with self.db.transaction(readonly=True) as s:
            return [
                {
                    "run": r.name,
                    "checkpoint_dir": r.checkpoint_dir,
                    "committed": c or 0,
                    "last_step": ls,
                    "bytes": int(b or 0),
                    "created_at": r.created_at,
                }
                for r, c, ls, b in s.execute(q)
            ]

    def set_model_metadata(self, run_id: int, metadata: dict[str, Any]) -> None:
        with self.db.transaction() as s:
            s.execute(update(Run).where(Run.id == run_id).values(model_metadata=metadata, model_metadata_at=utcnow()))

    # -- checkpoint lifecycle -----------------------------------------------------------------

    def begin(
        self,
        run_id: int,
        step_nr: int,
        token: str,
        directory: str,
        writer: WriterInfo,
        *,
        hash_algorithm: str,
        overwrite: bool,
    ) -> CheckpointInfo:
        """Insert the pending row (before any file is written)."""
        with self.db.transaction() as s:
            _refuse_begin(_begin_rows(s, run_id, step_nr), step_nr, overwrite)
            c = Checkpoint(
                run_id=run_id,
                step_nr=step_nr,
                state=State.PENDING,
                token=token,
                directory=directory,
                **_writer_columns(writer),
                hash_algorithm=hash_algorithm,
                model_preserved=False,
            )
            s.add(c)
            s.flush()
            self._event(s, c.id, None, State.PENDING.value, "begin_checkpoint", (writer.host, writer.pid))
            return _ckpt_info(c)

    def check_begin(self, run_id: int, step_nr: int, *, overwrite: bool) -> None:
        """Raise what :meth:`begin` would raise now for ``step_nr``, writing nothing (one read).

        An asynchronous save's ``begin_checkpoint`` asks this and leaves the insert to its background
        commit; :meth:`begin` checks again in its own transaction.
        """
        with self.db.transaction(readonly=True) as s:
            _refuse_begin(_begin_rows(s, run_id, step_nr), step_nr, overwrite)

    def heartbeat(self, ckpt_id: int) -> None:
        with self.db.transaction() as s:
            s.execute(
                update(Checkpoint)
                .where(Checkpoint.id == ckpt_id, Checkpoint.state == State.PENDING)
                .values(heartbeat_at=utcnow())
            )

    def commit(
        self,
        ckpt_id: int,
        files: Iterable[ShardInfo],
        scores: Mapping[str, float],
        user_metadata: dict[str, Any] | None,
        who: tuple[str, int],
        timings: SaveTimings | None = None,
    ) -> CheckpointInfo:
        """pending -> committed with every shard and score, superseding an older copy of the step.

        ``timings`` are recorded on the row; ``commit_seconds`` runs from ``timings.commit_started``
        to the last statement of this transaction (its COMMIT cannot be timed in the row it commits).
        """
        files = list(files)
        with self.db.transaction() as s:
            c = s.get(Checkpoint, ckpt_id)
            if c is None or State(c.state) != State.PENDING:
                raise ConcurrentModificationError(
                    f"checkpoint #{ckpt_id} is no longer pending "
                    f"({State(c.state).value if c else 'gone'}): it was rolled back by another process"
                )
            # one query for the other rows of this step that the commit changes: the live copy it
            # supersedes and model-only leftovers of deleted copies (the common case: none)
            others = s.execute(
                select(Checkpoint.id, Checkpoint.state, Checkpoint.model_preserved).where(
                    Checkpoint.run_id == c.run_id,
                    Checkpoint.step_nr == c.step_nr,
                    Checkpoint.id != ckpt_id,
                    or_(Checkpoint.state.in_(_LIVE), Checkpoint.model_preserved.is_(True)),
                )
            ).all()
            old = next((o for o in others if State(o.state).value in _LIVE), None)
            if old is not None and State(old.state) in _DAMAGED:
                why = f"replaced by a new save after damage ({State(old.state).value}): checkpoint #{ckpt_id}"
                self._move(s, old.id, [State(old.state)], State.SUPERSEDED, reason=why, who=who, delete_reason=why)
            elif old is not None:
                self._move(
                    s,
                    old.id,
                    [State(old.state)],
                    State.SUPERSEDED,
                    reason=f"overwritten by checkpoint #{ckpt_id}",
                    who=who,
                )
            preserved = [o.id for o in others if o.model_preserved]
            if preserved:  # a model-only leftover of a deleted copy is replaced too
                s.execute(
                    update(Shard)
                    .where(Shard.checkpoint_id.in_(preserved), Shard.removed_at.is_(None))
                    .values(removed_at=utcnow())
                )
                s.execute(
                    update(Checkpoint)
                    .where(Checkpoint.id.in_(preserved))
                    .values(model_preserved=False)
                    .execution_options(synchronize_session=False)
                )
            # Core executemany, not ORM objects: no identity map or RETURNING for rows this
            # transaction never reads back (a checkpoint of 8 ranks x 3 files has 24)
            if files:
                s.execute(
                    insert(Shard),
                    [
                        {
                            "checkpoint_id": ckpt_id,
                            "path": f.path,
                            "size_bytes": f.size_bytes,
                            "hash_algorithm": f.hash_algorithm,
                            "digest": f.digest,
                            "rank": f.rank,
                            "kind": f.kind,
                            "remote_checksum": f.remote_checksum,
                        }
                        for f in files
                    ],
                )
            if scores:
                rows = []
                for metric, value in scores.items():
                    v, raw = _score_columns(value)
                    rows.append({"checkpoint_id": ckpt_id, "metric": metric, "value": v, "raw_value": raw})
                s.execute(insert(Score), rows)
            now = utcnow()
            cost: dict[str, float] = {}
            if timings is not None:
                cost = {
                    "stage_seconds": timings.stage_seconds,
                    "write_seconds": timings.write_seconds,
                    "sync_seconds": timings.sync_seconds,
                    "commit_seconds": time.perf_counter() - timings.commit_started,
                }
            self._move(
                s,
                ckpt_id,
                State.PENDING,
                State.COMMITTED,
                reason="commit_checkpoint",
                who=who,
                **cost,
                committed_at=now,
                total_bytes=sum(f.size_bytes for f in files),
                file_count=len(files),
                user_metadata=user_metadata,
            )
            s.flush()
            s.refresh(c)
            return _ckpt_info(c, {m: _score_columns(v)[0] for m, v in scores.items()})

    def abort(self, ckpt_id: int, reason: str, who: tuple[str, int]) -> bool:
        """pending -> aborted; False when the row was no longer pending."""
        try:
            with self.db.transaction() as s:
                self._move(s, ckpt_id, State.PENDING, State.ABORTED, reason=reason, who=who)
            return True
        except ConcurrentModificationError:
            return False

    def mark_deleting(self, ckpt_id: int, reason: str, who: tuple[str, int], *, preserve_model: bool) -> None:
        with self.db.transaction() as s:
            self._move(
                s,
                ckpt_id,
                [State.COMMITTED, State.CORRUPT, State.MISSING],
                State.DELETING,
                reason=reason,
                who=who,
                delete_reason=reason,
                model_preserved=preserve_model,
            )

    def mark_deleted(self, ckpt_id: int, who: tuple[str, int], *, kept_paths: Iterable[str] = ()) -> None:
        kept = list(kept_paths)
        with self.db.transaction() as s:
            now = utcnow()
            reason = s.execute(select(Checkpoint.delete_reason).where(Checkpoint.id == ckpt_id)).scalar_one()
            q = update(Shard).where(Shard.checkpoint_id == ckpt_id, Shard.removed_at.is_(None))
            if kept:
                q = q.where(Shard.path.not_in(kept))
            s.execute(q.values(removed_at=now))
            self._move(
                s,
                ckpt_id,
                State.DELETING,
                State.DELETED,
                reason=reason,
                who=who,
                deleted_at=now,
                model_preserved=bool(kept),
            )

    def mark_damaged(self, ckpt_id: int, state: State, reason: str, who: tuple[str, int]) -> bool:
        """committed -> corrupt / missing (only from committed: a concurrent delete wins)."""
        try:
            with self.db.transaction() as s:
                self._move(
                    s,
                    ckpt_id,
                    # never from the target state itself: damage found twice is recorded once
                    [x for x in (State.COMMITTED, State.CORRUPT, State.MISSING) if x != state],
                    state,
                    reason=reason,
                    who=who,
                    verified_at=utcnow(),
                    verify_result=state.value,
                )
            return True
        except ConcurrentModificationError:
            return False

    def mark_intact(self, ckpt_id: int, reason: str, who: tuple[str, int]) -> bool:
        """corrupt / missing -> committed (verify found every file matching again); False if it moved."""
        try:
            with self.db.transaction() as s:
                self._move(s, ckpt_id, [State.CORRUPT, State.MISSING], State.COMMITTED, reason=reason, who=who)
            return True
        except ConcurrentModificationError:
            return False

    def record_verified(self, ckpt_id: int, result: str) -> None:
        with self.db.transaction() as s:
            s.execute(
                update(Checkpoint).where(Checkpoint.id == ckpt_id).values(verified_at=utcnow(), verify_result=result)
            )

    # -- reads --------------------------------------------------------------------------------

    def _scores_for(self, s: Session, ids: Sequence[int]) -> dict[int, dict[str, float | None]]:
        out: dict[int, dict[str, float | None]] = {i: {} for i in ids}
        if not ids:
            return out
        for cid, metric, value, raw in s.execute(
            select(Score.checkpoint_id, Score.metric, Score.value, Score.raw_value).where(Score.checkpoint_id.in_(ids))
        ):
            out[cid][metric] = value if value is not None else float(raw)
        return out

    def checkpoints(
        self,
        run_id: int,
        *,
        states: Sequence[str] | None = None,
        step_nr: int | None = None,
        with_scores: bool = True,
    ) -> list[CheckpointInfo]:
        q = select(Checkpoint).where(Checkpoint.run_id == run_id)
        if states is not None:
            q = q.where(Checkpoint.state.in_(list(states)))
        if step_nr is not None:
            q = q.where(Checkpoint.step_nr == step_nr)
        q = q.order_by(Checkpoint.step_nr, Checkpoint.id)
        with self.db.transaction(readonly=True) as s:
            rows = list(s.execute(q).scalars())
            scores = self._scores_for(s, [r.id for r in rows]) if with_scores else {}
            return [_ckpt_info(r, scores.get(r.id)) for r in rows]

    def live(self, run_id: int, step_nr: int) -> CheckpointInfo | None:
        rows = self.checkpoints(run_id, states=_LIVE, step_nr=step_nr)
        return rows[0] if rows else None

    def committed_steps(self, run_id: int) -> list[int]:
        with self.db.transaction(readonly=True) as s:
            return list(
                s.execute(
                    select(Checkpoint.step_nr)
                    .where(Checkpoint.run_id == run_id, Checkpoint.state == State.COMMITTED)
                    .order_by(Checkpoint.step_nr)
                ).scalars()
            )

    def newest_committed(self, run_id: int, *, below: int | None = None) -> CheckpointInfo | None:
        q = select(Checkpoint).where(Checkpoint.run_id == run_id, Checkpoint.state == State.COMMITTED)
        if below is not None:
            q = q.where(Checkpoint.step_nr < below)
        q = q.order_by(Checkpoint.step_nr.desc()).limit(1)
        with self.db.transaction(readonly=True) as s:
            c = s.execute(q).scalar_one_or_none()
            return None if c is None else _ckpt_info(c, self._scores_for(s, [c.id])[c.id])

    def shards(self, ckpt_id: int, *, include_removed: bool = False) -> list[ShardInfo]:
        q = select(Shard).where(Shard.checkpoint_id == ckpt_id).order_by(Shard.path)
        if not include_removed:
            q = q.where(Shard.removed_at.is_(None))
        with self.db.transaction(readonly=True) as s:
            return [
                ShardInfo(
                    x.path,
                    x.size_bytes,
                    x.hash_algorithm,
                    x.digest,
                    x.rank,
                    x.kind,
                    x.removed_at is not None,
                    x.remote_checksum,
                )
                for x in s.execute(q).scalars()
            ]

    def tokens(self, run_id: int) -> dict[str, CheckpointInfo]:
        """Every checkpoint row of the run by its token (for reconciling directories)."""
        return {c.token: c for c in self.checkpoints(run_id, with_scores=False)}

    def pinned_steps(self, run_id: int) -> dict[int, list[str]]:
        with self.db.transaction(readonly=True) as s:
            out: dict[int, list[str]] = {}
            for step, label in s.execute(select(Pin.step_nr, Pin.label).where(Pin.run_id == run_id)):
                out.setdefault(step, []).append(label)
            return out

    def pin(self, run_id: int, step_nr: int, label: str) -> None:
        with self.db.transaction() as s:
            self._lock_run(s, run_id)  # serialises with retention claims on this run
            if (
                s.execute(
                    select(Checkpoint.id).where(
                        Checkpoint.run_id == run_id,
                        Checkpoint.step_nr == step_nr,
                        Checkpoint.state.in_(_LIVE),
                    )
                ).first()
                is None
            ):
                raise CheckpointNotFoundError(f"step {step_nr} has no committed checkpoint to pin", step_nr=step_nr)
            existing = s.execute(select(Pin).where(Pin.run_id == run_id, Pin.label == label)).scalar_one_or_none()
            if existing is not None:
                existing.step_nr = step_nr
                existing.created_at = utcnow()
            else:
                s.add(Pin(run_id=run_id, step_nr=step_nr, label=label))

    def unpin(self, run_id: int, label: str) -> bool:
        with self.db.transaction() as s:
            self._lock_run(s, run_id)
            p = s.execute(select(Pin).where(Pin.run_id == run_id, Pin.label == label)).scalar_one_or_none()
            if p is None:
                return False
            s.delete(p)
            return True

    # -- retention decisions (one query each, index-backed) -----------------------------------

    def committed_newest_first(self, run_id: int) -> list[tuple[int, int]]:
        """(step_nr, id) of committed checkpoints, newest first."""
        with self.db.transaction(readonly=True) as s:
            return [
                (a, b)
                for a, b in s.execute(
                    select(Checkpoint.step_nr, Checkpoint.id)
                    .where(Checkpoint.run_id == run_id, Checkpoint.state == State.COMMITTED)
                    .order_by(Checkpoint.step_nr.desc())
                )
            ]

    def ranked_by_score(self, run_id: int, metric: str, *, lower_better: bool) -> list[tuple[int, float | None]]:
        """(step_nr, value) of committed checkpoints with a finite score, best first; ties: later step first."""
        order = Score.value.asc() if lower_better else Score.value.desc()
        with self.db.transaction(readonly=True) as s:
            return [
                (a, b)
                for a, b in s.execute(
                    select(Checkpoint.step_nr, Score.value)
                    .join(Score, Score.checkpoint_id == Checkpoint.id)
                    .where(
                        Checkpoint.run_id == run_id,
                        Checkpoint.state == State.COMMITTED,
                        Score.metric == metric,
                        Score.value.is_not(None),
                    )
                    .order_by(order, Checkpoint.step_nr.desc())
                )
            ]

    def now(self) -> datetime:
        return utcnow()

    # -- retention as one query (ckptdb.catalog.retention_sql) ------------------------------

    def _lock_run(self, s: Session, run_id: int) -> None:
        """Serialise retention claims and pin changes on one run (SQLite: BEGIN IMMEDIATE already does)."""
        if self.db.dialect == "postgresql":
            # FOR NO KEY UPDATE: does not block inserts that reference the run (FOR KEY SHARE)
            s.execute(select(Run.id).where(Run.id == run_id).with_for_update(key_share=True))

    def _no_jit(self, s: Session) -> None:
        """PostgreSQL's JIT costs tens of ms to compile a plan this query runs in a few: off, for this transaction."""
        if self.db.dialect == "postgresql":
            s.execute(text("SET LOCAL jit = off"))

    def retention_plan(self, run_id: int, components: Sequence[Any]) -> Any:
        """The policy's decision for every committed checkpoint of the run, with reasons (one query)."""
        from ckptdb.retention import Plan

        q, names = retention_sql.decision_query(run_id, components, only_delete=False)
        with self.db.transaction(readonly=True) as s:
            self._no_jit(s)
            rows = list(s.connection().execute(q))  # Core rows: no ORM result processing
        keep: list[int] = []
        delete: list[int] = []
        reasons: dict[int, tuple[str, ...]] = {}
        model_only: list[int] = []
        for row in rows:
            why = retention_sql.reasons_of(row, names)
            if why:
                keep.append(row[1])
                reasons[row[1]] = why
            else:
                delete.append(row[1])
            if row[2]:
                model_only.append(row[1])
        return Plan(keep, delete, reasons, model_only)

    def retention_deletes(self, run_id: int, components: Sequence[Any]) -> list[int]:
        """Only the steps the policy deletes (one query; what the benchmark times)."""
        q = retention_sql.steps_to_delete(run_id, components)
        with self.db.transaction(readonly=True) as s:
            self._no_jit(s)
            text = s.connection().execute(q).scalar()
        return sorted(map(int, text.split(","))) if text else []

    def claim_for_deletion(
        self, run_id: int, components: Sequence[Any], reason: str, who: tuple[str, int], *, preserve_model: bool
    ) -> list[CheckpointInfo]:
        """Decide and claim in one transaction: -> deleting for every candidate the policy drops.

        Committed checkpoints move committed -> deleting (``model_preserved`` = ``preserve_model``:
        the intent). Without ``preserve_model``, model-only leftovers of earlier preserve_model
        deletions that the policy drops move deleted -> deleting with ``model_preserved`` cleared:
        their remaining files go the same two-phase way (a crash leaves a ``deleting`` row that
        recovery finishes). A leftover whose step has a pending or live row is left for later.

        The decision is re-made under the run's write lock, so a pin added or a checkpoint
        claimed by a concurrent prune since any earlier look is respected. Claiming some dropped
        candidates never changes which others are dropped (the kept set of every policy is
        unchanged by removing candidates it does not keep), so the two claims below agree. The
        caller removes the files and calls :meth:`mark_deleted` (``ckptdb gc`` finishes what a
        crash interrupts).
        """
        with self.db.transaction() as s:
            self._lock_run(s, run_id)
            self._no_jit(s)
            now = utcnow()
            moved: list[tuple[int, State]] = []  # (id, state it left)
            claimed = s.execute(
                update(Checkpoint)
                .where(
                    Checkpoint.id.in_(retention_sql.ids_to_delete(run_id, components)),
                    Checkpoint.state == State.COMMITTED,
                )
                .values(
                    state=State.DELETING,
                    state_changed_at=now,
                    delete_reason=reason,
                    model_preserved=preserve_model,
                )
                .returning(Checkpoint.id)
                .execution_options(synchronize_session=False)
            ).scalars()
            moved += [(i, State.COMMITTED) for i in claimed]
            if not preserve_model:
                other = Checkpoint.__table__.alias("o")
                busy = (
                    select(other.c.id)
                    .where(
                        other.c.run_id == Checkpoint.run_id,
                        other.c.step_nr == Checkpoint.step_nr,
                        other.c.id != Checkpoint.id,
                        other.c.state.in_([State.PENDING.value, *_LIVE]),
                    )
                    .exists()
                )
                leftovers = s.execute(
                    update(Checkpoint)
                    .where(
                        Checkpoint.id.in_(retention_sql.ids_to_delete(run_id, components)),
                        Checkpoint.state == State.DELETED,
                        Checkpoint.model_preserved.is_(True),
                        ~busy,
                    )
                    .values(
                        state=State.DELETING,
                        state_changed_at=now,
                        delete_reason=reason,
                        model_preserved=False,
                    )
                    .returning(Checkpoint.id)
                    .execution_options(synchronize_session=False)
                ).scalars()
                moved += [(i, State.DELETED) for i in leftovers]
            if not moved:
                return []
            s.execute(
                insert(CheckpointEvent),
                [
                    {
                        "checkpoint_id": i,
                        "at": now,
                        "from_state": frm.value,
                        "to_state": State.DELETING.value,
                        "reason": reason if frm == State.COMMITTED else f"{reason}: its preserved model files",
                        "host": who[0],
                        "pid": who[1],
                    }
                    for i, frm in moved
                ],
            )
            ids = [i for i, _ in moved]
            out: list[CheckpointInfo] = []
            for i in range(0, len(ids), 500):
                q = select(Checkpoint).where(Checkpoint.id.in_(ids[i : i + 500]))
                out += [_ckpt_info(c) for c in s.execute(q).scalars()]
            return sorted(out, key=lambda c: c.step_nr)

    def claim_model_only(self, ckpt_id: int, reason: str, who: tuple[str, int]) -> None:
        """deleted (model_preserved) -> deleting, model_preserved cleared: its model files are to go.

        Raises ConcurrentModificationError when the row is no longer a model-only leftover.
        """
        with self.db.transaction() as s:
            c = s.get(Checkpoint, ckpt_id)
            if c is None or State(c.state) != State.DELETED or not c.model_preserved:
                raise ConcurrentModificationError(f"checkpoint #{ckpt_id} is no longer a preserved model")
            self._move(
                s,
                ckpt_id,
                State.DELETED,
                State.DELETING,
                reason=f"{reason}: its preserved model files",
                who=who,
                delete_reason=reason,
                model_preserved=False,
            )

    def deletions(self, run_id: int) -> list[CheckpointInfo]:
        """Deleted (and being-deleted) checkpoints of a run with when and why, oldest first."""
        return self.checkpoints(run_id, states=[State.DELETING.value, State.DELETED.value], with_scores=False)

    def by_tokens(self, tokens: Iterable[str]) -> dict[str, CheckpointInfo]:
        toks = list(set(tokens))
        out: dict[str, CheckpointInfo] = {}
        with self.db.transaction(readonly=True) as s:
            for i in range(0, len(toks), 500):
                for c in s.execute(select(Checkpoint).where(Checkpoint.token.in_(toks[i : i + 500]))).scalars():
                    out[c.token] = _ckpt_info(c)
        return out

    def in_states(self, run_id: int, states: Sequence[State]) -> list[CheckpointInfo]:
        return self.checkpoints(run_id, states=[s.value for s in states], with_scores=False)

    def preserved_model(self, run_id: int, step_nr: int) -> CheckpointInfo | None:
        with self.db.transaction(readonly=True) as s:
            c = s.execute(
                select(Checkpoint)
                .where(
                    Checkpoint.run_id == run_id,
                    Checkpoint.step_nr == step_nr,
                    Checkpoint.state == State.DELETED,
                    Checkpoint.model_preserved.is_(True),
                )
                .order_by(Checkpoint.id.desc())
                .limit(1)
            ).scalar_one_or_none()
            return None if c is None else _ckpt_info(c)

    # -- adoption and inspection (ckptdb import / show / load_model) ----------------------------

    def adopt(
        self,
        run_id: int,
        step_nr: int,
        directory: str,
        files: Iterable[ShardInfo],
        scores: Mapping[str, float],
        writer: WriterInfo,
        *,
        hash_algorithm: str,
        written_at: datetime | None = None,
        reason: str = "imported",
        user_metadata: dict[str, Any] | None = None,
    ) -> CheckpointInfo:
        """Record an existing, complete step directory as a committed checkpoint with its shards and scores.

        One transaction: refuses (CheckpointExistsError) when the step already has a live or pending
        row, so adopting twice is harmless. The row gets a fresh token, but its directory carries no
        ``.ckptdb_token`` file (the user's files are never modified); recovery treats a tokenless
        ``step_<N>`` directory as belonging to the step's live row.
        """
        import secrets

        files = list(files)
        now = utcnow()
        at = written_at or now
        with self.db.transaction() as s:
            taken = s.execute(
                select(Checkpoint.state).where(
                    Checkpoint.run_id == run_id,
                    Checkpoint.step_nr == step_nr,
                    Checkpoint.state.in_([*_LIVE, State.PENDING.value]),
                )
            ).first()
            if taken is not None:
                raise CheckpointExistsError(
                    f"step {step_nr} already has a {State(taken[0]).value} checkpoint in the catalog", step_nr=step_nr
                )
            c = Checkpoint(
                run_id=run_id,
                step_nr=step_nr,
                state=State.COMMITTED,
                token=secrets.token_hex(8),
                directory=directory,
                created_at=at,
                committed_at=at,
                state_changed_at=now,
                heartbeat_at=now,
                **_writer_columns(writer),
                hash_algorithm=hash_algorithm,
                model_preserved=False,
                total_bytes=sum(f.size_bytes for f in files),
                file_count=len(files),
                user_metadata=user_metadata,
            )
            s.add(c)
            s.flush()
            for f in files:
                s.add(
                    Shard(
                        checkpoint_id=c.id,
                        path=f.path,
                        size_bytes=f.size_bytes,
                        hash_algorithm=f.hash_algorithm,
                        digest=f.digest,
                        rank=f.rank,
                        kind=f.kind,
                        remote_checksum=f.remote_checksum,
                    )
                )
            for metric, value in scores.items():
                v, raw = _score_columns(value)
                s.add(Score(checkpoint_id=c.id, metric=metric, value=v, raw_value=raw))
            self._event(s, c.id, None, State.COMMITTED.value, reason, (writer.host, writer.pid))
            s.flush()
            return _ckpt_info(c, {m: _score_columns(v)[0] for m, v in scores.items()})

    def events(self, ckpt_id: int) -> list[dict[str, Any]]:
        """A checkpoint's state history (``checkpoint_events``), oldest first."""
        with self.db.transaction(readonly=True) as s:
            return [
                {
                    "at": e.at,
                    "from_state": e.from_state,
                    "to_state": e.to_state,
                    "reason": e.reason,
                    "host": e.host,
                    "pid": e.pid,
                }
                for e in s.execute(
                    select(CheckpointEvent)
                    .where(CheckpointEvent.checkpoint_id == ckpt_id)
                    .order_by(CheckpointEvent.at, CheckpointEvent.id)
                ).scalars()
            ]

    def pin_step(self, run_id: int, label: str) -> int | None:
        """The step a pin label points at, or None."""
        with self.db.transaction(readonly=True) as s:
            return s.execute(select(Pin.step_nr).where(Pin.run_id == run_id, Pin.label == label)).scalar_one_or_none()

    def only_run(self) -> RunInfo | None:
        """The catalog's run when it has exactly one (so callers may omit the run name)."""
        with self.db.transaction(readonly=True) as s:
            runs = list(s.execute(select(Run).limit(2)).scalars())
            return _run_info(runs[0]) if len(runs) == 1 else None


def open_existing(url: str) -> Catalog | None:
    """The catalog at ``url`` when it exists with a schema; None when it would have to be created
    (a dry run, a run that never saved). Creates nothing."""
    from pathlib import Path

    from ckptdb.catalog.session import parse_url
    from ckptdb.errors import SchemaOutOfDateError

    parsed = parse_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database and not Path(parsed.database).exists():
        return None
    try:
        return Catalog(url, create=False)
    except SchemaOutOfDateError as e:
        if "has no ckptdb schema" in str(e):
            return None
        raise

"""Retention policies compiled to one SQL query (SQLite >= 3.25 and PostgreSQL).

The shape, for ``AnyOf(KeepLast(2), KeepBest(3, "valid_loss", lower_better=True), KeepEvery(1000))``
(the steps to delete; the plan with reasons selects the same conditions as columns)::

    SELECT c.id, c.step_nr FROM checkpoints c
    WHERE c.run_id = :run AND <candidate c> AND NOT (
          c.step_nr = (SELECT max(step_nr) FROM checkpoints                      -- newest
                       WHERE run_id = :run AND state = 'committed')
       OR c.step_nr IN (SELECT step_nr FROM pins WHERE run_id = :run)              -- pinned
       OR c.step_nr IN (SELECT step_nr FROM checkpoints k                        -- keep_last(2)
                        WHERE k.run_id = :run AND <candidate k>
                        ORDER BY step_nr DESC LIMIT 2)
       OR c.id IN (SELECT k.id FROM checkpoints k                                -- keep_best(3, ...)
                   WHERE k.run_id = :run AND <candidate k> AND <v> IS NOT NULL
                   ORDER BY <v> ASC, k.step_nr DESC LIMIT 3)
                   -- <v>: (SELECT value FROM scores WHERE checkpoint_id = k.id AND metric = 'valid_loss')
       OR c.step_nr % 1000 = 0)                                                  -- keep_every(1000)
    ORDER BY c.step_nr
    -- <candidate x>: x.state IN ('committed', 'deleted') AND (x.state = 'committed' OR x.model_preserved)

A candidate is a committed checkpoint or the model-only leftover of a ``preserve_model=True``
deletion (a ``deleted`` row with ``model_preserved``): fairseq2 counts such a step directory as a
step, so "keep the last n" and "keep the best n" rank it like the others, and when it falls out
its model files go too (:meth:`ckptdb.catalog.Catalog.claim_for_deletion`). Reading
``model_preserved`` costs one row lookup per deleted row of the run (the index has no such
column; a partial index would need a migration), about a millisecond per few thousand rows.

Each component is a ``LIMIT n`` subquery, evaluated once: the same answer as a
``ROW_NUMBER() OVER (ORDER BY ...) <= n`` window per component, but the database stops after n
rows of the ``checkpoints(run_id, state, step_nr)`` index for keep_last and keeps a top-n sort
for keep_best (about 4x faster than the window form on SQLite for a 10 000-checkpoint run).
``checkpoints(run_id, state, step_nr)`` serves every scan, ``scores(checkpoint_id, metric)``
each score and ``pins(run_id, step_nr)`` the pins: nothing outside the run is read.
Unscored, NaN and infinite scores are NULL in ``scores.value`` and never rank among the best.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from sqlalchemy import ColumnElement, Select, String, and_, cast, false, func, literal_column, not_, or_, select
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement

from ckptdb.catalog.models import Checkpoint, Pin, Score, State

# pin labels never contain control characters (validation.name), so this separator is unambiguous
LABEL_SEP = "\x1f"


def component_specs(components: Sequence[Any]) -> list[tuple[Any, ...]]:
    """Plain tuples for the policy components this module compiles (KeepPinned is implied)."""
    from ckptdb.retention import KeepBest, KeepEvery, KeepLast, KeepPinned

    out: list[tuple[Any, ...]] = []
    for c in components:
        if isinstance(c, KeepLast):
            out.append(("last", c.n, str(c)))
        elif isinstance(c, KeepBest):
            out.append(("best", c.n, str(c), c.metric, c.lower_better))
        elif isinstance(c, KeepEvery):
            out.append(("every", c.k, str(c)))
        elif isinstance(c, KeepPinned):
            continue
        else:
            raise TypeError(f"not a retention component: {c!r}")
    return out


class _no_index(FunctionElement[Any]):
    """``x`` as an expression no index serves (SQLite ``+x``, elsewhere ``(x || '')``): the planner
    must not drive keep_best from ``scores(metric, value)`` in value order across every run's scores
    (PostgreSQL did: its decision for a run with few candidates grew with the catalog, 4 -> 24 ms from
    20 000 to 100 000 checkpoints); it looks each candidate's score up by ``checkpoint_id`` instead."""

    inherit_cache = True
    name = "no_index"


@compiles(_no_index)
def _no_index_default(element: _no_index, compiler: Any, **kw: Any) -> str:
    # PostgreSQL (and others): an expression no index on the bare column serves
    return "(" + str(compiler.process(element.clauses, **kw)) + " || '')"


@compiles(_no_index, "sqlite")
def _no_index_sqlite(element: _no_index, compiler: Any, **kw: Any) -> str:
    return "+" + str(compiler.process(element.clauses, **kw))


_COMMITTED: ColumnElement[str] = literal_column(f"'{State.COMMITTED.value}'")
_DELETED: ColumnElement[str] = literal_column(f"'{State.DELETED.value}'")


def candidate(t: Any) -> ColumnElement[bool]:
    """``t``'s row is a retention candidate: committed, or the model-only leftover of a preserve_model deletion.

    The states are literals, not bound parameters: the text then matches the predicate of the
    partial index ``ix_checkpoints_retention_candidates`` (revision 0006), which a planner can
    only use when it can prove the query implies it.
    """
    return and_(
        t.c.state.in_([_COMMITTED, _DELETED]),
        or_(t.c.state == _COMMITTED, t.c.model_preserved.is_(True)),
    )


def _committed(run_id: int) -> Any:
    c = Checkpoint.__table__.alias("k")
    return c, (c.c.run_id == run_id, c.c.state == State.COMMITTED.value)


def _candidates(run_id: int) -> Any:
    c = Checkpoint.__table__.alias("k")
    return c, (c.c.run_id == run_id, candidate(c))


def decision_query(run_id: int, components: Sequence[Any], *, only_delete: bool) -> tuple[Select[Any], list[str]]:
    """The decision as one SELECT over the run's candidates (committed checkpoints, model-only leftovers).

    ``only_delete=False``: ``(id, step_nr, model_only, newest, pins, k0..kn)`` for every candidate
    (the plan with a reason per step). ``only_delete=True``: ``(id, step_nr)`` of the candidates
    no component keeps. Returns the statement and the component names (the ``k`` columns' order).
    """
    return _decision_query(run_id, tuple(component_specs(components)), only_delete=only_delete)


def _decision_query(
    run_id: int, specs: tuple[tuple[Any, ...], ...], *, only_delete: bool
) -> tuple[Select[Any], list[str]]:
    c = Checkpoint.__table__.alias("c")
    mine = (c.c.run_id == run_id, candidate(c))

    def newest() -> ColumnElement[bool]:
        k, where = _committed(run_id)
        # only a committed row is the newest (never NULL for one: a model-only row alone gets false)
        return and_(
            c.c.state == State.COMMITTED.value,
            c.c.step_nr == select(func.max(k.c.step_nr)).where(*where).scalar_subquery(),
        )

    def kept_by(spec: tuple[Any, ...]) -> ColumnElement[bool]:
        kind, n = spec[0], spec[1]
        if kind == "every":
            return (c.c.step_nr % n) == 0
        k, where = _candidates(run_id)
        if kind == "last":  # the n newest: n entries of the (run_id, state, step_nr) index
            return c.c.step_nr.in_(select(k.c.step_nr).where(*where).order_by(k.c.step_nr.desc()).limit(n))
        metric, lower_better = spec[3], spec[4]
        # the run's candidates joined to their score through scores(checkpoint_id, metric, value)
        # (revision 0006: answered from the index, no table row); a join, not a correlated
        # subquery, because SQLite takes the unique (checkpoint_id, metric) index for a
        # single-table lookup without weighing the covering one
        s = Score.__table__.alias("s")
        best = (
            select(k.c.id)
            .select_from(k.join(s, and_(s.c.checkpoint_id == k.c.id, _no_index(s.c.metric) == metric)))
            .where(*where, s.c.value.is_not(None))  # NULL: unscored, NaN, +/-inf (never best)
            .order_by(s.c.value.asc() if lower_better else s.c.value.desc(), k.c.step_nr.desc())  # ties
            .limit(n)
        )
        return c.c.id.in_(best)

    flags = [kept_by(spec) for spec in specs]
    names = [spec[2] for spec in specs]
    if only_delete:
        pinned = c.c.step_nr.in_(select(Pin.step_nr).where(Pin.run_id == run_id))  # read once, not per row
        q = select(c.c.id, c.c.step_nr).where(*mine, not_(or_(newest(), pinned, *flags, false()))).order_by(c.c.step_nr)
        return q, names
    labels = (
        select(Pin.step_nr.label("step_nr"), func.aggregate_strings(Pin.label, LABEL_SEP).label("labels"))
        .where(Pin.run_id == run_id)
        .group_by(Pin.step_nr)
        .subquery("p")
    )
    q = (
        select(
            c.c.id,
            c.c.step_nr,
            (c.c.state == State.DELETED.value).label("model_only"),
            newest().label("newest"),
            labels.c.labels.label("pins"),
            *[f.label(f"k{i}") for i, f in enumerate(flags)],
        )
        .select_from(c.outerjoin(labels, labels.c.step_nr == c.c.step_nr))
        .where(*mine)
        .order_by(c.c.step_nr)
    )
    return q, names


def reasons_of(row: Sequence[Any], names: Sequence[str]) -> tuple[str, ...]:
    """The keep reasons of one decision row, in :func:`ckptdb.retention.decide`'s order."""
    from ckptdb.retention import NEWEST, pin_reason

    out: list[str] = []
    if row[3]:
        out.append(NEWEST)
    if row[4] is not None:
        out.append(pin_reason(str(row[4]).split(LABEL_SEP)))
    out += [name for name, flag in zip(names, row[5:], strict=True) if flag]
    return tuple(out)


def steps_to_delete(run_id: int, components: Sequence[Any]) -> Select[Any]:
    """The step numbers the policy deletes as one comma-separated string (NULL: none).

    One row instead of one per step: with ~10 000 steps to delete, building 10 000 result rows in
    Python cost more than the query itself (docs/benchmarks.md, "Catalog").
    """
    return _steps_to_delete(run_id, tuple(component_specs(components)))


@functools.lru_cache(maxsize=64)
def _steps_to_delete(run_id: int, specs: tuple[tuple[Any, ...], ...]) -> Select[Any]:
    # built once per (run, policy): building the statement (table aliases, subqueries) cost
    # about as much as running it; a Select is immutable, so sharing it is safe
    q, _ = _decision_query(run_id, specs, only_delete=True)
    d = q.order_by(None).subquery("d")
    return select(func.aggregate_strings(cast(d.c.step_nr, String), ","))


def ids_to_delete(run_id: int, components: Sequence[Any]) -> Select[Any]:
    """``SELECT id`` of the candidates the policy does not keep (for ``UPDATE ... IN``)."""
    q, _ = decision_query(run_id, components, only_delete=True)
    sub = q.subquery("d")
    return select(sub.c.id)


def explain(conn: Any, q: Select[Any]) -> list[str]:
    """The database's plan for ``q`` (SQLite: EXPLAIN QUERY PLAN details; PostgreSQL: EXPLAIN lines)."""
    compiled = q.compile(conn, compile_kwargs={"render_postcompile": True})  # IN lists expanded
    if conn.dialect.name == "sqlite":
        params = tuple(compiled.params[k] for k in compiled.positiontup or ())
        return [str(r[-1]) for r in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + compiled.string, params)]
    return [str(r[0]) for r in conn.exec_driver_sql("EXPLAIN " + compiled.string, compiled.params)]

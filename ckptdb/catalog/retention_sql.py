"""Retention policies compiled to one SQL query (SQLite >= 3.25 and PostgreSQL).

The shape, for ``AnyOf(KeepLast(2), KeepBest(3, "valid_loss", lower_better=True), KeepEvery(1000))``::

    SELECT r.id, r.step_nr,
           r.rn_last = 1                              AS newest,
           r.pins                                     AS pins,      -- labels, NULL when unpinned
           r.rn_last <= 2                             AS k0,        -- keep_last(2)
           r.v1 IS NOT NULL AND r.rn1 <= 3            AS k1,        -- keep_best(3, ...)
           r.step_nr % 1000 = 0                       AS k2         -- keep_every(1000)
    FROM (
      SELECT c.id, c.step_nr, p.labels AS pins,
             ROW_NUMBER() OVER (ORDER BY c.step_nr DESC)                             AS rn_last,
             s1.value AS v1,
             ROW_NUMBER() OVER (ORDER BY s1.value IS NULL, s1.value ASC, c.step_nr DESC) AS rn1
      FROM checkpoints c
      LEFT JOIN scores s1 ON s1.checkpoint_id = c.id AND s1.metric = 'valid_loss'
      LEFT JOIN (SELECT step_nr, string_agg(label, ...) AS labels FROM pins
                 WHERE run_id = :run GROUP BY step_nr) p ON p.step_nr = c.step_nr
      WHERE c.run_id = :run AND c.state = 'committed'
    ) r
    [WHERE NOT (newest OR pins IS NOT NULL OR k0 OR k1 OR k2)]      -- only the steps to delete
    ORDER BY r.step_nr

``checkpoints(run_id, state, step_nr)`` serves the scan in step order, ``scores(checkpoint_id,
metric)`` each score and ``pins(run_id, step_nr)`` the pins: nothing outside the run is read.
Unscored, NaN and infinite scores are NULL in ``scores.value`` and sort after every finite
score, so they never rank among the best.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, case, false, func, not_, or_, select
from sqlalchemy.orm import aliased

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


def decision_query(run_id: int, components: Sequence[Any], *, only_delete: bool) -> tuple[Select[Any], list[str]]:
    """The decision as one SELECT: (id, step_nr, newest, pins, k0..kn) per committed checkpoint.

    Returns the statement and the component names, in the order of the ``k`` columns.
    """
    specs = component_specs(components)
    c = Checkpoint.__table__.alias("c")
    labels = (
        select(Pin.step_nr.label("step_nr"), func.aggregate_strings(Pin.label, LABEL_SEP).label("labels"))
        .where(Pin.run_id == run_id)
        .group_by(Pin.step_nr)
        .subquery("p")
    )
    cols: list[Any] = [
        c.c.id,
        c.c.step_nr,
        labels.c.labels.label("pins"),
        func.row_number().over(order_by=c.c.step_nr.desc()).label("rn_last"),
    ]
    frm: Any = c.outerjoin(labels, labels.c.step_nr == c.c.step_nr)
    for i, spec in enumerate(specs):
        if spec[0] != "best":
            continue
        metric, lower_better = spec[3], spec[4]
        s = aliased(Score.__table__, name=f"s{i}")  # type: ignore[arg-type]
        frm = frm.outerjoin(s, and_(s.c.checkpoint_id == c.c.id, s.c.metric == metric))
        order = s.c.value.asc() if lower_better else s.c.value.desc()
        nulls_last = case((s.c.value.is_(None), 1), else_=0)
        cols.append(s.c.value.label(f"v{i}"))
        cols.append(func.row_number().over(order_by=(nulls_last, order, c.c.step_nr.desc())).label(f"rn{i}"))
    inner = select(*cols).select_from(frm).where(c.c.run_id == run_id, c.c.state == State.COMMITTED.value).subquery("r")
    flags: list[ColumnElement[bool]] = []
    for i, spec in enumerate(specs):
        kind, n = spec[0], spec[1]
        if kind == "last":
            flags.append(inner.c.rn_last <= n)
        elif kind == "best":
            flags.append(and_(inner.c[f"v{i}"].is_not(None), inner.c[f"rn{i}"] <= n))
        else:
            flags.append((inner.c.step_nr % n) == 0)
    newest = inner.c.rn_last == 1
    pinned = inner.c.pins.is_not(None)
    q = select(
        inner.c.id,
        inner.c.step_nr,
        newest.label("newest"),
        inner.c.pins,
        *[f.label(f"k{i}") for i, f in enumerate(flags)],
    )
    if only_delete:
        q = q.where(not_(or_(newest, pinned, *flags, false())))
    q = q.order_by(inner.c.step_nr)
    return q, [spec[2] for spec in specs]


def reasons_of(row: Sequence[Any], names: Sequence[str]) -> tuple[str, ...]:
    """The keep reasons of one decision row, in :func:`ckptdb.retention.decide`'s order."""
    from ckptdb.retention import NEWEST, pin_reason

    out: list[str] = []
    if row[2]:
        out.append(NEWEST)
    if row[3] is not None:
        out.append(pin_reason(str(row[3]).split(LABEL_SEP)))
    out += [name for name, flag in zip(names, row[4:], strict=True) if flag]
    return tuple(out)


def ids_to_delete(run_id: int, components: Sequence[Any]) -> Select[Any]:
    """``SELECT id`` of the committed checkpoints the policy does not keep (for ``UPDATE ... IN``)."""
    q, _ = decision_query(run_id, components, only_delete=True)
    sub = q.subquery("d")
    return select(sub.c.id)

"""Retention policies: which committed checkpoints to keep.

A policy is a union of small rules (its *components*). The same rule has two implementations:

- :func:`decide`, a pure function over plain values (:class:`Candidate`), testable without a
  database;
- the catalog's compiled query (:mod:`ckptdb.catalog.retention_sql`): one ``SELECT`` with a
  ``ROW_NUMBER()`` window per component, answered by the database from its indexes, so the
  decision never loads a run's rows into Python. :func:`plan` returns it.

A property test checks that both agree on random inputs, on SQLite and PostgreSQL.

Rules shared by every policy (docs/retention.md):

- the candidates are the ``committed`` checkpoints and the *model-only* leftovers of
  ``preserve_model=True`` deletions (``deleted`` rows with ``model_preserved``): as in fairseq2,
  where such a step directory is still a step, they rank and count toward "kept" like any other;
  a model-only step that a later decision drops loses its model files too (unless that deletion
  also preserves models). Pending, corrupt, missing, deleting and fully deleted ones never count;
- the newest committed checkpoint is always kept (the resume point);
- pinned checkpoints are always kept;
- best-N ranks finite scores only (unscored, NaN and +/-inf never rank as best); among equal
  scores the later step ranks first.

Example:
    >>> policy = AnyOf(KeepLast(2), KeepBest(3, metric="valid_loss", lower_better=True), KeepEvery(10_000))
    >>> decide(policy, [Candidate(1, {"valid_loss": 0.5}), Candidate(2, {"valid_loss": 0.7})]).keep
    [1, 2]
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from ckptdb.errors import InvalidArgumentError
from ckptdb.validation import MAX_INT64

if TYPE_CHECKING:
    from ckptdb.catalog import Catalog

NEWEST = "newest"


@dataclass(frozen=True, slots=True)
class Candidate:
    """What a policy sees of one checkpoint: committed, or (``model_only``) a preserved model's leftover."""

    step_nr: int
    scores: Mapping[str, float | None] = field(default_factory=dict)
    model_only: bool = False


@runtime_checkable
class Policy(Protocol):
    def keep(self, candidates: Sequence[Candidate]) -> set[int]: ...
    def components(self) -> tuple[Component, ...]: ...


@dataclass(frozen=True, slots=True)
class KeepLast:
    """Keep the ``n`` newest committed checkpoints."""

    n: int

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, int) or not 1 <= self.n <= MAX_INT64:
            raise InvalidArgumentError(f"KeepLast(n) needs an integer n >= 1, not {self.n!r}")

    def keep(self, candidates: Sequence[Candidate]) -> set[int]:
        return set(sorted(c.step_nr for c in candidates)[-self.n :])

    def components(self) -> tuple[Component, ...]:
        return (self,)

    def __str__(self) -> str:
        return f"keep_last({self.n})"


@dataclass(frozen=True, slots=True)
class KeepBest:
    """Keep the ``n`` best committed checkpoints by ``metric`` (finite scores only; ties: later step)."""

    n: int
    metric: str = "score"
    lower_better: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, int) or not 1 <= self.n <= MAX_INT64:
            raise InvalidArgumentError(f"KeepBest(n) needs an integer n >= 1, not {self.n!r}")
        if not isinstance(self.metric, str) or not self.metric:
            raise InvalidArgumentError(f"KeepBest(metric) needs a metric name, not {self.metric!r}")

    def keep(self, candidates: Sequence[Candidate]) -> set[int]:
        return {s for _, s in self.ranked(candidates)[: self.n]}

    def ranked(self, candidates: Sequence[Candidate]) -> list[tuple[float, int]]:
        """(score, step) of the candidates with a finite score, best first."""
        scored = [(c.scores.get(self.metric), c.step_nr) for c in candidates]
        finite = [(float(v), s) for v, s in scored if v is not None and math.isfinite(v)]
        sign = 1.0 if self.lower_better else -1.0
        finite.sort(key=lambda vs: (sign * vs[0], -vs[1]))
        return finite

    def components(self) -> tuple[Component, ...]:
        return (self,)

    def __str__(self) -> str:
        return f"keep_best({self.n}, metric={self.metric!r}, {'lower' if self.lower_better else 'higher'}_better)"


@dataclass(frozen=True, slots=True)
class KeepEvery:
    """Keep every committed checkpoint whose step is a multiple of ``k``."""

    k: int

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or not 1 <= self.k <= MAX_INT64:
            raise InvalidArgumentError(f"KeepEvery(k) needs an integer k >= 1, not {self.k!r}")

    def keep(self, candidates: Sequence[Candidate]) -> set[int]:
        return {c.step_nr for c in candidates if c.step_nr % self.k == 0}

    def components(self) -> tuple[Component, ...]:
        return (self,)

    def __str__(self) -> str:
        return f"keep_every({self.k})"


@dataclass(frozen=True, slots=True)
class KeepPinned:
    """Keep pinned checkpoints (always implied; alone it means "keep only pinned and newest")."""

    def keep(self, candidates: Sequence[Candidate]) -> set[int]:
        return set()  # pins are not a property of the candidates: decide() adds them

    def components(self) -> tuple[Component, ...]:
        return (self,)

    def __str__(self) -> str:
        return "keep_pinned"


Component = KeepLast | KeepBest | KeepEvery | KeepPinned


@dataclass(frozen=True, slots=True)
class AnyOf:
    """The union of several policies: a checkpoint is kept when any of them keeps it."""

    policies: tuple[Policy, ...]

    def __init__(self, *policies: Policy) -> None:
        if not policies:
            raise InvalidArgumentError("AnyOf() needs at least one policy")
        for p in policies:
            if not isinstance(p, Policy):
                raise InvalidArgumentError(f"AnyOf() takes retention policies, not {p!r}")
        object.__setattr__(self, "policies", tuple(policies))

    def keep(self, candidates: Sequence[Candidate]) -> set[int]:
        out: set[int] = set()
        for p in self.policies:
            out |= p.keep(candidates)
        return out

    def components(self) -> tuple[Component, ...]:
        out: list[Component] = []
        for p in self.policies:
            for c in p.components():
                if c not in out:
                    out.append(c)
        return tuple(out)

    def __str__(self) -> str:
        return " | ".join(str(p) for p in self.policies)


@dataclass(frozen=True, slots=True)
class Plan:
    """A retention decision: the steps kept (each with its reasons) and the steps to delete.

    ``model_only`` lists the steps (kept or not) that are model-only leftovers of an earlier
    ``preserve_model=True`` deletion: deleting one removes its remaining model files.
    """

    keep: list[int]
    delete: list[int]
    reasons: dict[int, tuple[str, ...]] = field(default_factory=dict)  # kept step -> why
    model_only: list[int] = field(default_factory=list)

    def reason(self, step_nr: int) -> str:
        return ", ".join(self.reasons.get(step_nr, ())) or "-"

    def deletes(self, *, preserve_model: bool = False) -> list[int]:
        """The steps whose files carrying out the plan removes: with ``preserve_model``, the dropped
        committed ones (their non-model files); otherwise every dropped step, model-only ones included."""
        if not preserve_model:
            return list(self.delete)
        model_only = set(self.model_only)
        return [s for s in self.delete if s not in model_only]


def pin_reason(labels: Sequence[str]) -> str:
    return f"pinned({', '.join(sorted(labels))})"


def decide(
    policy: Policy,
    candidates: Sequence[Candidate],
    pinned: Mapping[int, Sequence[str]] | Set[int] = frozenset(),
) -> Plan:
    """The pure rule: which of the committed ``candidates`` survive ``policy``.

    Args:
        policy: a policy (``KeepLast(2)``, ``AnyOf(...)``, ...).
        candidates: the run's committed checkpoints and model-only leftovers (nothing else counts).
        pinned: pinned steps, optionally with their labels (``{step: [label, ...]}``).
    """
    steps = sorted(c.step_nr for c in candidates)
    full = [c.step_nr for c in candidates if not c.model_only]
    labels: dict[int, list[str]] = (
        {s: list(v) for s, v in pinned.items()} if isinstance(pinned, Mapping) else {s: [] for s in pinned}
    )
    reasons: dict[int, list[str]] = {}
    if full:  # the resume point: the newest *committed* checkpoint
        reasons.setdefault(max(full), []).append(NEWEST)
    for s in steps:
        if s in labels:
            reasons.setdefault(s, []).append(pin_reason(labels[s]))
    for comp in policy.components():
        for s in sorted(comp.keep(candidates)):
            reasons.setdefault(s, []).append(str(comp))
    kept = sorted(reasons)
    model_only = sorted(c.step_nr for c in candidates if c.model_only)
    return Plan(kept, [s for s in steps if s not in reasons], {s: tuple(r) for s, r in reasons.items()}, model_only)


def plan(catalog: Catalog, run_id: int, policy: Policy) -> Plan:
    """The same rule, answered by the catalog in one query (see :mod:`ckptdb.catalog.retention_sql`)."""
    return catalog.retention_plan(run_id, policy.components())


def deletion_reason(policy: Policy) -> str:
    """What a deletion by ``policy`` records in ``checkpoints.delete_reason``."""
    return f"pruned by {policy}"


__all__ = [
    "AnyOf",
    "Candidate",
    "Component",
    "KeepBest",
    "KeepEvery",
    "KeepLast",
    "KeepPinned",
    "Plan",
    "Policy",
    "decide",
    "deletion_reason",
    "plan",
]

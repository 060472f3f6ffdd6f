"""Retention policies: which committed checkpoints to keep.

A policy answers "which steps to keep" from plain values (:meth:`Policy.keep`), so the rule is
testable without a database; :func:`plan` asks the catalog for the same answer. Rules shared by
every policy:

- only ``committed`` checkpoints are candidates and only they count toward "kept" (pending,
  corrupt, missing and deleted ones never do);
- the newest committed checkpoint is always kept (the resume point);
- pinned checkpoints are always kept;
- best-N ranks finite scores only (unscored, NaN and inf never rank as best); ties go to the
  later step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from ckptdb.catalog import Catalog


@dataclass(frozen=True, slots=True)
class Candidate:
    """What a policy sees of one committed checkpoint."""

    step_nr: int
    scores: Mapping[str, float | None] = field(default_factory=dict)


class Policy(Protocol):
    def keep(self, candidates: Sequence[Candidate]) -> set[int]: ...
    def keep_in(self, catalog: Catalog, run_id: int) -> set[int]: ...


@dataclass(frozen=True, slots=True)
class KeepLast:
    n: int

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"KeepLast(n) needs n >= 1, not {self.n}")

    def keep(self, candidates: Sequence[Candidate]) -> set[int]:
        return set(sorted(c.step_nr for c in candidates)[-self.n :])

    def keep_in(self, catalog: Catalog, run_id: int) -> set[int]:
        return {s for s, _ in catalog.committed_newest_first(run_id)[: self.n]}

    def __str__(self) -> str:
        return f"keep_last({self.n})"


@dataclass(frozen=True, slots=True)
class KeepBest:
    n: int
    metric: str = "score"
    lower_better: bool = False

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"KeepBest(n) needs n >= 1, not {self.n}")

    def keep(self, candidates: Sequence[Candidate]) -> set[int]:
        scored = [(c.scores.get(self.metric), c.step_nr) for c in candidates]
        finite = [(v, s) for v, s in scored if v is not None and math.isfinite(v)]
        sign = 1.0 if self.lower_better else -1.0
        finite.sort(key=lambda vs: (sign * vs[0], -vs[1]))
        return {s for _, s in finite[: self.n]}

    def keep_in(self, catalog: Catalog, run_id: int) -> set[int]:
        ranked = catalog.ranked_by_score(run_id, self.metric, lower_better=self.lower_better)
        return {s for s, _ in ranked[: self.n]}

    def __str__(self) -> str:
        return f"keep_best({self.n}, metric={self.metric!r}, {'lower' if self.lower_better else 'higher'}_better)"


@dataclass(frozen=True, slots=True)
class KeepEvery:
    k: int

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"KeepEvery(k) needs k >= 1, not {self.k}")

    def keep(self, candidates: Sequence[Candidate]) -> set[int]:
        return {c.step_nr for c in candidates if c.step_nr % self.k == 0}

    def keep_in(self, catalog: Catalog, run_id: int) -> set[int]:
        return {s for s, _ in catalog.committed_newest_first(run_id) if s % self.k == 0}

    def __str__(self) -> str:
        return f"keep_every({self.k})"


@dataclass(frozen=True, slots=True)
class AnyOf:
    """The union of several policies."""

    policies: tuple[Policy, ...]

    def __init__(self, *policies: Policy) -> None:
        object.__setattr__(self, "policies", tuple(policies))

    def keep(self, candidates: Sequence[Candidate]) -> set[int]:
        out: set[int] = set()
        for p in self.policies:
            out |= p.keep(candidates)
        return out

    def keep_in(self, catalog: Catalog, run_id: int) -> set[int]:
        out: set[int] = set()
        for p in self.policies:
            out |= p.keep_in(catalog, run_id)
        return out

    def __str__(self) -> str:
        return " | ".join(str(p) for p in self.policies)


@dataclass(frozen=True, slots=True)
class Plan:
    keep: list[int]
    delete: list[int]


def decide(policy: Policy, candidates: Sequence[Candidate], pinned: set[int] = frozenset()) -> Plan:  # type: ignore[assignment]
    """The pure rule: which committed steps survive ``policy``."""
    steps = sorted(c.step_nr for c in candidates)
    kept = policy.keep(candidates) | (pinned & set(steps))
    if steps:
        kept.add(steps[-1])
    return Plan(sorted(kept), [s for s in steps if s not in kept])


def plan(catalog: Catalog, run_id: int, policy: Policy) -> Plan:
    """The same rule, answered by catalog queries."""
    committed = [s for s, _ in catalog.committed_newest_first(run_id)]
    if not committed:
        return Plan([], [])
    kept = policy.keep_in(catalog, run_id) | set(catalog.pinned_steps(run_id)) & set(committed)
    kept.add(committed[0])
    return Plan(sorted(kept), sorted(s for s in committed if s not in kept))

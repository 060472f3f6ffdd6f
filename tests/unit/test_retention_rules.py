"""The pure retention rule: reasons, pins, unions, validation (no database)."""

from __future__ import annotations

import math

import pytest

from ckptdb.retention import AnyOf, Candidate, KeepBest, KeepEvery, KeepLast, KeepPinned, decide, deletion_reason


def test_reasons_pins_and_unions() -> None:
    c = [Candidate(s, {"loss": v}) for s, v in [(10, 0.3), (20, math.nan), (30, 0.1), (40, math.inf), (50, 0.9)]]
    policy = AnyOf(KeepLast(1), AnyOf(KeepBest(1, metric="loss", lower_better=True), KeepLast(1)), KeepEvery(20))
    assert policy.components() == (KeepLast(1), KeepBest(1, "loss", True), KeepEvery(20))  # flattened, deduplicated
    plan = decide(policy, c, {10: ["b", "a"], 99: ["not-a-candidate"]})
    assert plan.keep == [10, 20, 30, 40, 50] and plan.delete == []
    assert plan.reasons[10] == ("pinned(a, b)",)
    assert plan.reasons[30] == ("keep_best(1, metric='loss', lower_better)",)
    assert plan.reasons[50] == ("newest", "keep_last(1)")
    assert plan.reason(20) == "keep_every(20)" and plan.reason(12345) == "-"
    only_pins = decide(KeepPinned(), c, {20})
    assert only_pins.keep == [20, 50] and only_pins.delete == [10, 30, 40]
    assert deletion_reason(policy) == "pruned by keep_last(1) | keep_best(1, metric='loss', lower_better) | " + (
        "keep_last(1) | keep_every(20)"
    )


def test_best_ignores_unscored_nan_and_inf_and_ties_go_later() -> None:
    c = [
        Candidate(1, {}),
        Candidate(2, {"score": -math.inf}),
        Candidate(3, {"score": 1.0}),
        Candidate(4, {"score": 1.0}),
    ]
    assert decide(KeepBest(1, lower_better=True), c).keep == [4]
    assert decide(KeepBest(5), c).keep == [3, 4]  # never more than the finite ones; newest 4 too


@pytest.mark.parametrize("bad", [0, -1, True, 1.5])
def test_invalid_counts_are_refused(bad: object) -> None:
    for make in (KeepLast, KeepBest, KeepEvery):
        with pytest.raises(ValueError):
            make(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        AnyOf()
    with pytest.raises(ValueError):
        AnyOf(3)  # type: ignore[arg-type]

"""Retention: the SQL decision equals the pure rule; policies, pins, reasons and preserve_model through
the manager and the CLI, on a real catalog (SQLite always, PostgreSQL with --db-url)."""

from __future__ import annotations

import math
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckptdb import AnyOf, FileCheckpointManager, KeepBest, KeepEvery, KeepLast
from ckptdb.catalog import Catalog
from ckptdb.cli import main
from ckptdb.retention import Candidate, KeepPinned, Policy, decide, plan
from tests.helpers import insert_rows, save, sql

STATES = ["committed", "committed", "committed", "pending", "deleted", "corrupt", "missing", "aborted"]
SCORES = st.one_of(
    st.none(),
    st.sampled_from([0.0, -0.0, 1.0, 1.0, 2.5, -3.0, math.nan, math.inf, -math.inf]),
    st.floats(min_value=-10, max_value=10, allow_nan=False),
)
COMPONENT = st.one_of(
    st.builds(KeepLast, st.integers(1, 6)),
    st.builds(KeepBest, st.integers(1, 6), st.sampled_from(["score", "valid_loss"]), st.booleans()),
    st.builds(KeepEvery, st.integers(1, 7)),
    st.just(KeepPinned()),
)
POLICY = st.one_of(COMPONENT, st.lists(COMPONENT, min_size=1, max_size=4).map(lambda ps: AnyOf(*ps)))


@st.composite
def runs(draw: st.DrawFn) -> tuple[list[tuple[int, str, dict[str, float | None]]], dict[int, list[str]]]:
    steps = draw(st.lists(st.integers(0, 60), unique=True, max_size=25))
    rows = [(s, draw(st.sampled_from(STATES)), {"score": draw(SCORES), "valid_loss": draw(SCORES)}) for s in steps]
    pinned = draw(st.lists(st.sampled_from(steps), unique=True, max_size=3)) if steps else []
    pins = {s: [f"p{s}"] + (["x"] if i == 0 else []) for i, s in enumerate(pinned)}
    return rows, pins


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=runs(), policy=POLICY)
def test_sql_plan_equals_decide(catalog_url: str, data: tuple, policy: Policy) -> None:
    rows, pins = data
    cat = Catalog(catalog_url)
    run_id = insert_rows(cat, f"r-{uuid.uuid4().hex}", rows, pins)
    committed = [Candidate(s, sc) for s, st_, sc in rows if st_ == "committed"]
    expected = decide(policy, committed, pins)
    got = plan(cat, run_id, policy)
    assert got == expected
    assert cat.retention_deletes(run_id, policy.components()) == expected.delete


def test_decision_query_uses_the_indexes(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'c.db'}"
    cat = Catalog(url)
    run_id = insert_rows(cat, "r", [(s, "committed", {"score": s / 7}) for s in range(50)], {3: ["a"]})
    from ckptdb.catalog import retention_sql

    q, _ = retention_sql.decision_query(
        run_id, AnyOf(KeepLast(2), KeepBest(3), KeepEvery(5)).components(), only_delete=True
    )
    with cat.db.transaction(readonly=True) as s:
        detail = " | ".join(retention_sql.explain(s.connection(), q))
    # the run's candidates from the partial covering index of revision 0006 (no table row per
    # checkpoint), each candidate's score from scores(checkpoint_id, metric, value) alone, and never
    # from scores(metric, value) across every run
    assert "SEARCH c USING COVERING INDEX ix_checkpoints_retention_candidates (run_id=?)" in detail, detail
    assert "SEARCH s USING COVERING INDEX ix_scores_checkpoint_id_metric_value (checkpoint_id=?)" in detail, detail
    assert "ix_scores_metric_value" not in detail, detail
    assert "ix_pins_run_id_step_nr (run_id=?)" in detail, detail
    scans = [x for x in detail.split(" | ") if x.startswith("SCAN ")]
    assert scans == [], detail  # every table is reached through an index, never scanned


def test_retention_option_applies_after_every_commit(tmp_path: Path, catalog_url: str) -> None:
    policy = AnyOf(KeepLast(2), KeepBest(1, metric="valid_loss", lower_better=True), KeepEvery(100))
    m = FileCheckpointManager(tmp_path / "c", catalog=catalog_url, retention=policy)
    for step, loss in [(50, 0.1), (100, 0.9), (150, 0.5), (200, 0.6), (250, 0.7), (300, 0.8)]:
        m.begin_checkpoint(step)
        m.save_state({"model": {}, "step_nr": step})
        m.save_score(loss, metric="valid_loss")
        m.commit_checkpoint()
    assert m.get_step_numbers() == [50, 100, 200, 250, 300]
    assert sorted(p.name for p in m.checkpoint_dir.glob("step_*")) == [
        "step_100", "step_200", "step_250", "step_300", "step_50",
    ]  # fmt: skip
    # SQL answers "what did retention delete and why"
    rows = sql(
        catalog_url,
        "SELECT c.step_nr, c.delete_reason, c.deleted_at IS NOT NULL, e.reason FROM checkpoints c "
        "JOIN checkpoint_events e ON e.checkpoint_id = c.id AND e.to_state = 'deleting' "
        "WHERE c.state = 'deleted' ORDER BY c.step_nr",
    )
    why = f"pruned by {policy}"
    assert rows == [(150, why, True, why)]
    assert [c.step_nr for c in m.catalog.deletions(m.run.id)] == [150]
    plan_now = m.retention_plan(policy)
    assert plan_now.delete == [] and plan_now.reasons[200] == ("keep_every(100)",)
    assert plan_now.reasons[50] == ("keep_best(1, metric='valid_loss', lower_better)",)


def test_fairseq2_calls_with_preserve_model_and_pins(tmp_path: Path, catalog_url: str) -> None:
    m = FileCheckpointManager(tmp_path / "c", catalog=catalog_url)
    for step, score in [(1, 0.3), (2, 0.9), (3, 0.1), (4, 0.5)]:
        save(m, step, score=score)
    m.pin(1, "release-1")
    assert m.keep_best_n_checkpoints(1, preserve_model=True) == [3]
    step_3 = sorted(p.name for p in (m.checkpoint_dir / "step_3").iterdir())
    assert step_3 == [".ckptdb_token", "model.pt", "score.txt"]
    rows = sql(catalog_url, "SELECT step_nr, model_preserved, delete_reason FROM checkpoints WHERE state = 'deleted'")
    assert [(s, bool(p), r) for s, p, r in rows] == [(3, True, "pruned by keep_best(1, metric='score', higher_better)")]
    # the model-only step 3 is still a step (fairseq2): keep_last(1) removes its model too
    assert m.keep_last_n_checkpoints(1) == [2, 3]
    assert m.get_step_numbers() == [1, 4]
    assert not (m.checkpoint_dir / "step_2").exists() and not (m.checkpoint_dir / "step_3").exists()
    rows = sql(catalog_url, "SELECT step_nr, model_preserved, delete_reason FROM checkpoints WHERE state = 'deleted'")
    assert sorted((s, bool(p), r) for s, p, r in rows) == [
        (2, False, "pruned by keep_last(1)"),
        (3, False, "pruned by keep_last(1)"),
    ]


def test_cli_prune_pin_unpin_and_preserve_model(
    tmp_path: Path, catalog_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    m = FileCheckpointManager(tmp_path / "c", catalog=catalog_url, run="exp")
    for step, loss in [(10, 0.9), (20, 0.1), (30, 0.5), (40, 0.3), (50, 0.8), (60, 0.7)]:
        m.begin_checkpoint(step)
        m.save_state({"model": {"w": step}, "opt": step})
        m.save_score(loss, metric="valid_loss")
        m.commit_checkpoint()
    url = ["--url", catalog_url]
    assert main(["pin", *url, "exp", "30", "--label", "release-1"]) == 0
    assert main(["pin", *url, "exp", "999", "--label", "nope"]) == 2
    capsys.readouterr()
    args = ["prune", *url, "exp", "--keep-last", "1", "--keep-best", "1", "--metric", "valid_loss", "--lower-better"]
    assert main([*args, "--keep-every", "20", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dry run" in out and "would keep 4, delete 2" in out
    assert "pinned(release-1)" in out and "newest, keep_last(1)" in out
    assert m.get_step_numbers() == [10, 20, 30, 40, 50, 60]
    assert main([*args, "--preserve-model"]) == 0
    out = capsys.readouterr().out
    assert "kept 3, deleted 3" in out
    assert m.get_step_numbers() == [20, 30, 60]
    step_10 = m.checkpoint_dir / "step_10"
    assert (step_10 / "model.pt").exists() and not (step_10 / "rank_0.pt").exists()
    preserved = sql(catalog_url, "SELECT step_nr FROM checkpoints WHERE state = 'deleted' AND model_preserved")
    assert sorted(r[0] for r in preserved) == [10, 40, 50]
    assert main(["unpin", *url, "exp", "--label", "release-1"]) == 0
    assert main(["unpin", *url, "exp", "--label", "release-1"]) == 1
    assert main(["prune", *url, "exp", "--keep-last", "1", "--json"]) == 0
    assert m.get_step_numbers() == [60]
    assert main(["prune", *url, "exp"]) == 2  # no policy: refused
    assert main(["prune", *url, "exp", "--keep-best", "2"]) == 2  # direction must be explicit
    assert main(["prune", *url, "exp", "--keep-last", "0"]) == 2

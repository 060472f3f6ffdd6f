"""Issue 10, item 7: fairseq2's keep_last_n_models / keep_best_n_models pattern frees disk.

The fairseq2 trainer calls ``keep_last_n_checkpoints(n_models)`` then
``keep_last_n_checkpoints(n_ckpts, preserve_model=True)`` after every save (the same with
``keep_best_n_checkpoints``). A model-only step left by the second call is still a step directory
for fairseq2, so a later first call removes it when it falls out. The tests below run that loop on
a real catalog (SQLite, and PostgreSQL with --db-url) and compare the disk and the catalog after
every step with a reference model of fairseq2's FileCheckpointManager written here.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckptdb import AnyOf, FileCheckpointManager, KeepBest, KeepEvery, KeepLast, SaveOptions
from ckptdb.catalog import Catalog
from ckptdb.catalog.models import Checkpoint
from ckptdb.cli import main
from ckptdb.errors import CheckpointNotFoundError
from ckptdb.loader import load_model
from ckptdb.retention import Candidate, KeepPinned, Policy, decide, plan
from tests.helpers import insert_rows, make_state, sql

FAST = SaveOptions(fsync=False)
TOKEN = ".ckptdb_token"


class Fairseq2Reference:
    """fairseq2's FileCheckpointManager retention (v0.3/v0.4), over step directories.

    - ``get_step_numbers()``: every ``step_N`` directory, model-only ones included;
    - ``keep_last_n_checkpoints(n, preserve_model)``: delete ``steps[:-n]``;
    - ``keep_best_n_checkpoints(n, preserve_model)``: rank every step by its ``score.txt`` (worst
      first; ties: the earlier step first), delete ``ranked[:-n]`` except the newest step;
    - ``delete_checkpoint(step, preserve_model=True)`` unlinks the top-level ``*.pt`` files whose
      stem does not start with ``model`` (everything else stays); without it, ``rmtree``.
    """

    def __init__(self) -> None:
        self.dirs: dict[int, set[str]] = {}
        self.scores: dict[int, float] = {}
        self.full: set[int] = set()

    def save(self, step: int, files: set[str], score: float) -> None:
        self.dirs[step] = set(files)
        self.scores[step] = score
        self.full.add(step)

    def delete(self, step: int, preserve_model: bool) -> None:
        if preserve_model:
            self.dirs[step] = {f for f in self.dirs[step] if not (f.endswith(".pt") and not f.startswith("model"))}
            self.full.discard(step)
        else:
            del self.dirs[step]
            self.full.discard(step)

    def keep_last(self, n: int, *, preserve_model: bool = False) -> None:
        for step in sorted(self.dirs)[:-n]:
            self.delete(step, preserve_model)

    def keep_best(self, n: int, *, preserve_model: bool = False, lower_better: bool = False) -> None:
        steps = sorted(self.dirs)
        last = steps[-1]
        sign = -1.0 if lower_better else 1.0
        ranked = sorted((sign * self.scores[s], s) for s in steps)  # worst first
        for _, step in ranked[:-n]:
            if step != last:
                self.delete(step, preserve_model)

    def disk(self) -> dict[str, set[str]]:
        return {f"step_{s}": files for s, files in self.dirs.items()}


def disk(d: Path) -> dict[str, set[str]]:
    """Every entry of the checkpoint directory but the catalog: step_N -> its files."""
    out: dict[str, set[str]] = {}
    for p in d.iterdir():
        if p.name.endswith((".db", ".db-wal", ".db-shm")) or p.name == "model.yaml":
            continue
        assert p.is_dir(), p
        out[p.name] = {str(f.relative_to(p)) for f in p.rglob("*") if f.is_file()}
    return out


def catalog_rows(url: str, run: str) -> dict[int, tuple[str, bool, list[str]]]:
    """step -> (state, model_preserved, paths of shards still on disk per the catalog)."""
    rows = sql(
        url,
        "SELECT c.step_nr, c.state, c.model_preserved, s.path, s.removed_at IS NULL FROM checkpoints c "
        "JOIN runs r ON r.id = c.run_id LEFT JOIN shards s ON s.checkpoint_id = c.id "
        "WHERE r.name = :run ORDER BY c.step_nr, s.path",
        run=run,
    )
    out: dict[int, tuple[str, bool, list[str]]] = {}
    for step, state, preserved, path, present in rows:
        entry = out.setdefault(step, (state, bool(preserved), []))
        if path is not None and present:
            entry[2].append(path)
    return out


def save(m: FileCheckpointManager, step: int, score: float) -> None:
    m.begin_checkpoint(step)
    m.save_state(make_state(step))
    m.save_score(score)
    m.commit_checkpoint()


def check_step(m: FileCheckpointManager, ref: Fairseq2Reference, url: str) -> None:
    assert disk(m.checkpoint_dir) == ref.disk()  # the same directories, the same files in each
    assert m.get_step_numbers() == sorted(ref.full)  # committed: the full checkpoints
    rows = catalog_rows(url, m.run_name)
    for step, (state, preserved, present) in rows.items():
        if step in ref.full:
            assert (state, preserved) == ("committed", False), (step, rows[step])
        elif step in ref.dirs:
            assert (state, preserved) == ("deleted", True), (step, rows[step])
        else:
            assert (state, preserved) == ("deleted", False), (step, rows[step])
        # the catalog says exactly which files are still there
        assert set(present) == ref.dirs.get(step, {TOKEN}) - {TOKEN}, (step, present)


def score_of(step: int) -> float:
    return [0.5, 0.9, 0.1, 0.9, 0.3, 0.7, 0.2, 0.8, 0.6, 0.4, 0.9, 0.05][step % 12]  # ties included


@pytest.mark.parametrize(("n_models", "n_ckpts"), [(3, 1), (1, 2), (2, 2), (4, 2)])
def test_trainer_keep_last_n_models_matches_fairseq2(
    tmp_path: Path, catalog_url: str, n_models: int, n_ckpts: int
) -> None:
    m = FileCheckpointManager(tmp_path / "c", catalog=catalog_url, run="exp", save_options=FAST)
    ref = Fairseq2Reference()
    for step in range(1, 11):
        save(m, step, score_of(step))
        ref.save(step, disk(m.checkpoint_dir)[f"step_{step}"], score_of(step))
        # fairseq2's trainer, after every save
        m.keep_last_n_checkpoints(n_models)
        m.keep_last_n_checkpoints(n_ckpts, preserve_model=True)
        ref.keep_last(n_models)
        ref.keep_last(n_ckpts, preserve_model=True)
        check_step(m, ref, catalog_url)
    # the disk holds n_models steps, never more (before the fix: every model file stayed forever)
    assert len(ref.dirs) == n_models and len(disk(m.checkpoint_dir)) == n_models


@pytest.mark.parametrize(("n_models", "n_ckpts", "lower_better"), [(3, 1, False), (3, 1, True), (1, 3, False)])
def test_trainer_keep_best_n_models_matches_fairseq2(
    tmp_path: Path, catalog_url: str, n_models: int, n_ckpts: int, lower_better: bool
) -> None:
    m = FileCheckpointManager(tmp_path / "c", catalog=catalog_url, run="exp", save_options=FAST)
    ref = Fairseq2Reference()
    for step in range(1, 11):
        save(m, step, score_of(step))
        ref.save(step, disk(m.checkpoint_dir)[f"step_{step}"], score_of(step))
        m.keep_best_n_checkpoints(n_models, lower_better=lower_better)
        m.keep_best_n_checkpoints(n_ckpts, lower_better=lower_better, preserve_model=True)
        ref.keep_best(n_models, lower_better=lower_better)
        ref.keep_best(n_ckpts, lower_better=lower_better, preserve_model=True)
        check_step(m, ref, catalog_url)


def test_model_only_step_loads_then_goes_with_delete_checkpoint(tmp_path: Path, catalog_url: str) -> None:
    m = FileCheckpointManager(tmp_path / "c", catalog=catalog_url, run="exp", save_options=FAST)
    for step in (1, 2, 3):
        save(m, step, score_of(step))
    assert m.keep_last_n_checkpoints(1, preserve_model=True) == [1, 2]
    # a model-only step: load_model still serves its model; load_checkpoint does not (not committed)
    model, _ = load_model(catalog_url, run="exp", select=1)
    assert set(model) == {"w", "b"}
    with pytest.raises(CheckpointNotFoundError):
        m.load_checkpoint(1)
    m.delete_checkpoint(1, preserve_model=True)  # nothing but the model is left: nothing to do
    assert (m.checkpoint_dir / "step_1" / "model.pt").exists()
    m.delete_checkpoint(1)  # fairseq2: rmtree of the model-only directory
    assert not (m.checkpoint_dir / "step_1").exists()
    with pytest.raises(CheckpointNotFoundError):
        load_model(catalog_url, run="exp", select=1)
    with pytest.raises(CheckpointNotFoundError):
        m.delete_checkpoint(1)
    m.delete_checkpoint(1, missing_ok=True)
    events = sql(
        catalog_url,
        "SELECT e.from_state, e.to_state FROM checkpoint_events e JOIN checkpoints c ON c.id = e.checkpoint_id "
        "WHERE c.step_nr = 1 ORDER BY e.id",
    )
    assert events == [
        (None, "pending"),
        ("pending", "committed"),
        ("committed", "deleting"),
        ("deleting", "deleted"),
        ("deleted", "deleting"),  # its preserved model files are to go
        ("deleting", "deleted"),
    ]
    # a reopened manager has nothing to finish, and the loop goes on
    again = FileCheckpointManager(tmp_path / "c", catalog=catalog_url, run="exp", save_options=FAST)
    assert again.last_recovery is not None and not again.last_recovery.changed
    assert again.keep_last_n_checkpoints(1) == [2]
    assert sorted(disk(m.checkpoint_dir)) == ["step_3"]


def test_cli_prune_plans_and_removes_model_only_steps(
    tmp_path: Path, catalog_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    m = FileCheckpointManager(tmp_path / "c", catalog=catalog_url, run="exp", save_options=FAST)
    for step in (10, 20, 30, 40):
        save(m, step, score_of(step))
    m.keep_last_n_checkpoints(1, preserve_model=True)  # 10, 20, 30: model only
    url = ["--url", catalog_url]
    capsys.readouterr()
    assert main(["prune", *url, "exp", "--keep-last", "2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    lines = {ln.split()[0]: ln for ln in out.splitlines() if ln.split() and ln.split()[0].isdigit()}
    assert "keep model" in lines["30"] and "keep_last(2)" in lines["30"]
    assert "delete model" in lines["10"] and "delete model" in lines["20"]
    assert "newest" in lines["40"]
    assert "would keep 2, delete 2" in out
    # with --preserve-model nothing is left to remove from model-only steps
    assert main(["prune", *url, "exp", "--keep-last", "2", "--preserve-model", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["delete"] == [] and rep["deleted"] == [] and rep["model_only"] == [10, 20, 30]
    assert sorted(disk(m.checkpoint_dir)) == ["step_10", "step_20", "step_30", "step_40"]
    assert main(["prune", *url, "exp", "--keep-last", "2", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["delete"] == [10, 20] and rep["deleted"] == [10, 20]
    assert sorted(disk(m.checkpoint_dir)) == ["step_30", "step_40"]


STATES = ["committed", "committed", "model_only", "model_only", "pending", "deleted", "corrupt", "missing"]
SCORES = st.one_of(st.none(), st.sampled_from([0.0, 1.0, 1.0, 2.5, float("nan"), float("inf")]))
COMPONENT = st.one_of(
    st.builds(KeepLast, st.integers(1, 6)),
    st.builds(KeepBest, st.integers(1, 6), st.just("score"), st.booleans()),
    st.builds(KeepEvery, st.integers(1, 7)),
    st.just(KeepPinned()),
)
POLICY = st.one_of(COMPONENT, st.lists(COMPONENT, min_size=1, max_size=3).map(lambda ps: AnyOf(*ps)))


@st.composite
def runs(draw: st.DrawFn) -> tuple[list[tuple[int, str, float | None]], dict[int, list[str]]]:
    steps = draw(st.lists(st.integers(0, 40), unique=True, max_size=20))
    rows = [(s, draw(st.sampled_from(STATES)), draw(SCORES)) for s in steps]
    pinned = draw(st.lists(st.sampled_from(steps), unique=True, max_size=2)) if steps else []
    return rows, {s: [f"p{s}"] for s in pinned}


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=runs(), policy=POLICY)
def test_sql_plan_equals_decide_with_model_only_steps(catalog_url: str, data: tuple, policy: Policy) -> None:
    rows, pins = data
    cat = Catalog(catalog_url)
    as_rows = [(s, "deleted" if st_ == "model_only" else st_, {"score": sc}) for s, st_, sc in rows]
    run_id = insert_rows(cat, f"r-{uuid.uuid4().hex}", as_rows, pins)
    model_only = [s for s, st_, _ in rows if st_ == "model_only"]
    from sqlalchemy import update

    with cat.db.transaction() as s:
        s.execute(
            update(Checkpoint)
            .where(Checkpoint.run_id == run_id, Checkpoint.step_nr.in_(model_only))
            .values(model_preserved=True)
        )
    candidates = [
        Candidate(s, {"score": sc}, model_only=st_ == "model_only")
        for s, st_, sc in rows
        if st_ in ("committed", "model_only")
    ]
    expected = decide(policy, candidates, pins)
    got = plan(cat, run_id, policy)
    assert got == expected
    assert cat.retention_deletes(run_id, policy.components()) == expected.delete

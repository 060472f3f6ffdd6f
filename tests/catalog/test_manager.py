"""The fairseq2-style API end to end on a real catalog (SQLite always, PostgreSQL with --db-url)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from ckptdb import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    FileCheckpointManager,
    InvalidArgumentError,
    InvalidOperationError,
)
from tests.helpers import assert_state_equal, make_state, save, sql, work_dirs


@pytest.fixture
def mgr(tmp_path: Path, catalog_url: str) -> FileCheckpointManager:
    return FileCheckpointManager(tmp_path / "ckpt", catalog=catalog_url)


def test_round_trip_as_fairseq2_docs_show(tmp_path: Path, catalog_url: str) -> None:
    ckpt_manager = FileCheckpointManager(checkpoint_dir=tmp_path / "checkpoints", catalog=catalog_url)
    model = torch.nn.Linear(8, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(3, 8)).sum().backward()
    optimizer.step()
    ckpt_manager.begin_checkpoint(step_nr=1000)
    ckpt_manager.save_state(
        {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step_nr": 1000, "epoch": 5}
    )
    ckpt_manager.save_score(0.25)
    ckpt_manager.commit_checkpoint()

    step_nr, state = ckpt_manager.load_last_checkpoint()
    assert step_nr == 1000
    assert_state_equal(state["model"], model.state_dict())
    assert_state_equal(state["optimizer"], optimizer.state_dict())
    assert state["step_nr"] == 1000 and state["epoch"] == 5
    assert_state_equal(ckpt_manager.load_checkpoint(step_nr=1000), state)
    step_dir = tmp_path / "checkpoints" / "step_1000"
    assert sorted(p.name for p in step_dir.iterdir()) == [".ckptdb_token", "model.pt", "rank_0.pt", "score.txt"]
    assert (step_dir / "score.txt").read_text() == "0.25\n"
    fresh = torch.nn.Linear(8, 4)
    fresh.load_state_dict(state["model"])


def test_catalog_records_every_shard_and_reproducibility(mgr: FileCheckpointManager, catalog_url: str) -> None:
    mgr.begin_checkpoint(10)
    mgr.save_state(make_state(10))
    mgr.save_metadata({"lr": 0.5, "config": {"layers": 2}, "tokens": torch.tensor(7)})
    mgr.save_score(0.5)
    mgr.save_score(1.5, metric="valid_loss")
    mgr.commit_checkpoint()
    rows = sql(
        catalog_url,
        "SELECT s.path, s.size_bytes, s.hash_algorithm, length(s.digest) FROM shards s "
        "JOIN checkpoints c ON c.id = s.checkpoint_id WHERE c.step_nr = 10 ORDER BY s.path",
    )
    step_dir = mgr.checkpoint_dir / "step_10"
    assert [r[0] for r in rows] == ["metadata.pt", "model.pt", "rank_0.pt", "score.txt"]
    for path, size, algo, dlen in rows:
        assert (step_dir / path).stat().st_size == size
        assert algo == "xxh3_128" and dlen == 32
    (ckpt,) = sql(
        catalog_url,
        "SELECT state, torch_version, ckptdb_version, writer_host, writer_pid, world_size, "
        "total_bytes, file_count FROM checkpoints WHERE step_nr = 10",
    )
    assert ckpt[0] == "committed" and ckpt[1] == torch.__version__ and ckpt[2] == "0.1.0"
    assert ckpt[5] == 1 and ckpt[6] == sum(r[1] for r in rows) and ckpt[7] == 4
    scores = sql(catalog_url, "SELECT metric, value FROM scores ORDER BY metric")
    assert scores == [("score", 0.5), ("valid_loss", 1.5)]
    assert mgr.load_metadata(10) == {"lr": 0.5, "config": {"layers": 2}, "tokens": torch.tensor(7)}
    info = mgr.get_checkpoints()[0]
    assert info.user_metadata == {"lr": 0.5, "config": {"layers": 2}, "tokens": 7}
    events = sql(catalog_url, "SELECT from_state, to_state FROM checkpoint_events ORDER BY id")
    assert events == [(None, "pending"), ("pending", "committed")]


def test_bad_calls_raise_documented_errors(mgr: FileCheckpointManager) -> None:
    with pytest.raises(InvalidOperationError, match="must be called first"):
        mgr.save_state({"a": 1})
    with pytest.raises(InvalidOperationError):
        mgr.commit_checkpoint()
    with pytest.raises(InvalidOperationError):
        mgr.save_score(1.0)
    with pytest.raises(CheckpointNotFoundError):
        mgr.load_last_checkpoint()
    with pytest.raises(CheckpointNotFoundError):
        mgr.load_checkpoint(5)
    for bad in (-1, 1.5, "3", True, None):
        with pytest.raises(InvalidArgumentError, match="step_nr"):
            mgr.begin_checkpoint(bad)  # type: ignore[arg-type]
    mgr.begin_checkpoint(1)
    with pytest.raises(InvalidOperationError, match="already been called"):
        mgr.begin_checkpoint(2)
    mgr.abort_checkpoint()
    assert mgr.get_step_numbers() == []
    assert work_dirs(mgr.checkpoint_dir) == []
    with pytest.raises(InvalidOperationError):
        mgr.abort_checkpoint()


def test_abort_keeps_history(mgr: FileCheckpointManager, catalog_url: str) -> None:
    mgr.begin_checkpoint(3)
    mgr.save_state(make_state(3))
    mgr.abort_checkpoint()
    assert not (mgr.checkpoint_dir / "step_3").exists()
    assert sql(catalog_url, "SELECT state FROM checkpoints") == [("aborted",)]
    save(mgr, 3)
    assert mgr.get_step_numbers() == [3]


def test_committed_step_is_not_silently_replaced(mgr: FileCheckpointManager, catalog_url: str) -> None:
    save(mgr, 5, score=1.0)
    with pytest.raises(CheckpointExistsError, match="overwrite=True"):
        mgr.begin_checkpoint(5)
    # an overwrite keeps the old copy until the new one commits
    mgr.begin_checkpoint(5, overwrite=True)
    new_state = make_state(99)
    mgr.save_state(new_state)
    assert_state_equal(mgr.load_checkpoint(5), make_state(5))
    mgr.abort_checkpoint()
    assert_state_equal(mgr.load_checkpoint(5), make_state(5))
    mgr.begin_checkpoint(5, overwrite=True)
    mgr.save_state(new_state)
    mgr.commit_checkpoint()
    assert_state_equal(mgr.load_checkpoint(5), new_state)
    assert work_dirs(mgr.checkpoint_dir) == []
    states = sql(catalog_url, "SELECT state FROM checkpoints ORDER BY id")
    assert states == [("superseded",), ("aborted",), ("committed",)]


def test_scores_nan_inf_and_metrics(mgr: FileCheckpointManager, catalog_url: str) -> None:
    save(mgr, 1, score=float("nan"))
    save(mgr, 2, score=float("inf"))
    save(mgr, 3, score=0.5)
    save(mgr, 4, score=0.7)
    save(mgr, 5)  # unscored, newest
    rows = sql(
        catalog_url,
        "SELECT c.step_nr, s.value, s.raw_value FROM scores s JOIN checkpoints c "
        "ON c.id = s.checkpoint_id ORDER BY c.step_nr",
    )
    assert rows[0][1] is None and rows[0][2] == "nan"
    assert rows[1][1] is None and rows[1][2] == "inf"
    infos = {c.step_nr: c for c in mgr.get_checkpoints()}
    assert math.isnan(infos[1].scores["score"]) and infos[2].scores["score"] == math.inf
    deleted = mgr.keep_best_n_checkpoints(1)  # higher is better: 0.7 wins; inf/NaN are never best
    assert sorted(deleted) == [1, 2, 3]
    assert mgr.get_step_numbers() == [4, 5]
    with pytest.raises(InvalidArgumentError):
        mgr.begin_checkpoint(6)
        mgr.save_score("high")  # type: ignore[arg-type]


def test_keep_last_and_best(mgr: FileCheckpointManager) -> None:
    for step, score in [(10, 0.9), (20, 0.1), (30, 0.5), (40, 0.3), (50, 0.8)]:
        save(mgr, step, score=score)
    assert mgr.keep_best_n_checkpoints(n=2, lower_better=True) == [10, 30]
    assert mgr.get_step_numbers() == [20, 40, 50]  # best two (0.1, 0.3) + the newest
    assert mgr.keep_last_n_checkpoints(n=1) == [20, 40]
    assert mgr.get_step_numbers() == [50]
    with pytest.raises(InvalidArgumentError):
        mgr.keep_last_n_checkpoints(n=0)


def test_ties_go_to_the_later_step(mgr: FileCheckpointManager) -> None:
    for step in (1, 2, 3, 4):
        save(mgr, step, score=1.0 if step < 4 else 0.0)
    mgr.keep_best_n_checkpoints(n=1)
    assert mgr.get_step_numbers() == [3, 4]


def test_delete_is_two_phase_and_recorded(mgr: FileCheckpointManager, catalog_url: str) -> None:
    save(mgr, 1)
    save(mgr, 2)
    mgr.delete_checkpoint(1)
    assert not (mgr.checkpoint_dir / "step_1").exists()
    assert mgr.get_step_numbers() == [2]
    with pytest.raises(CheckpointNotFoundError):
        mgr.delete_checkpoint(1)
    mgr.delete_checkpoint(1, missing_ok=True)
    events = sql(
        catalog_url,
        "SELECT e.from_state, e.to_state, e.reason FROM checkpoint_events e JOIN checkpoints c "
        "ON c.id = e.checkpoint_id WHERE c.step_nr = 1 ORDER BY e.id",
    )
    assert [(a, b) for a, b, _ in events] == [
        (None, "pending"),
        ("pending", "committed"),
        ("committed", "deleting"),
        ("deleting", "deleted"),
    ]
    (row,) = sql(catalog_url, "SELECT state, delete_reason, deleted_at IS NOT NULL FROM checkpoints WHERE step_nr=1")
    assert row == ("deleted", "manual", True)
    assert sql(
        catalog_url,
        "SELECT count(*) FROM shards s JOIN checkpoints c ON c.id = s.checkpoint_id "
        "WHERE c.step_nr = 1 AND s.removed_at IS NULL",
    ) == [(0,)]


def test_preserve_model(mgr: FileCheckpointManager, catalog_url: str) -> None:
    save(mgr, 1, score=1.0)
    save(mgr, 2, score=2.0)
    mgr.keep_last_n_checkpoints(1, preserve_model=True)
    step_1 = sorted(p.name for p in (mgr.checkpoint_dir / "step_1").iterdir())
    assert step_1 == [".ckptdb_token", "model.pt", "score.txt"]
    assert mgr.get_step_numbers() == [2]
    (row,) = sql(catalog_url, "SELECT state, model_preserved, delete_reason FROM checkpoints WHERE step_nr = 1")
    assert row[0] == "deleted" and row[1] in (True, 1) and row[2] == "pruned by keep_last(1)"
    kept = sql(
        catalog_url,
        "SELECT s.path FROM shards s JOIN checkpoints c ON c.id = s.checkpoint_id "
        "WHERE c.step_nr = 1 AND s.removed_at IS NULL",
    )
    assert sorted(kept) == [("model.pt",), ("score.txt",)]  # what fairseq2 keeps: model*.pt and score.txt
    # a reopened manager leaves the preserved model alone
    again = FileCheckpointManager(mgr.checkpoint_dir, catalog=catalog_url)
    assert again.last_recovery is not None and not again.last_recovery.changed
    assert (mgr.checkpoint_dir / "step_1" / "model.pt").exists()


def test_pins_survive_retention(mgr: FileCheckpointManager) -> None:
    for step in (1, 2, 3):
        save(mgr, step)
    mgr.pin(1, "release-1")
    assert mgr.keep_last_n_checkpoints(1) == [2]
    assert mgr.get_step_numbers() == [1, 3]
    assert mgr.unpin("release-1")
    assert mgr.keep_last_n_checkpoints(1) == [1]


def test_unsafe_state_refused_at_save_with_key_named(mgr: FileCheckpointManager) -> None:
    class Custom:
        pass

    mgr.begin_checkpoint(1)
    with pytest.raises(InvalidArgumentError, match=r"state\['trainer'\]\['obj'\]"):
        mgr.save_state({"model": {"w": torch.zeros(2)}, "trainer": {"obj": Custom()}})
    with pytest.raises(InvalidArgumentError, match=r"lambda|function"):
        mgr.save_metadata({"fn": lambda: 1})
    mgr.save_state({"model": {"w": torch.zeros(2)}})
    mgr.commit_checkpoint()
    assert mgr.get_step_numbers() == [1]


def test_has_checkpoint_and_model_yaml(mgr: FileCheckpointManager, catalog_url: str) -> None:
    assert not mgr.has_checkpoint()
    save(mgr, 7)
    assert mgr.has_checkpoint() and mgr.has_checkpoint(7) and not mgr.has_checkpoint(8)
    mgr.save_model_metadata(family="llama", config={"dim": 16}, base_asset="llama3_8b")
    import yaml

    card = yaml.safe_load((mgr.checkpoint_dir / "model.yaml").read_text())
    assert card == {"name": "checkpoint", "base": "llama3_8b", "model_family": "llama", "model_config": {"dim": 16}}
    (md,) = sql(catalog_url, "SELECT model_metadata FROM runs")
    assert "llama" in str(md[0])


def test_run_names_are_data_not_paths(tmp_path: Path, catalog_url: str) -> None:
    for name in ("../../etc", "x'; DROP TABLE runs; --", "名前"):
        m = FileCheckpointManager(tmp_path / f"d{abs(hash(name))}", catalog=catalog_url, run=name)
        save(m, 1)
        assert m.get_step_numbers() == [1]
    assert len(sql(catalog_url, "SELECT name FROM runs")) == 3
    for bad in ("", "x" * 300, "a\nb"):
        with pytest.raises(InvalidArgumentError):
            FileCheckpointManager(tmp_path / "e", catalog=catalog_url, run=bad)
    with pytest.raises(InvalidArgumentError, match="already exists"):
        FileCheckpointManager(tmp_path / "other", catalog=catalog_url, run="../../etc")


def test_foreign_step_directory_is_never_touched(mgr: FileCheckpointManager) -> None:
    foreign = mgr.checkpoint_dir / "step_4"
    foreign.mkdir()
    (foreign / "model.pt").write_bytes(b"user data")
    with pytest.raises(CheckpointExistsError, match="ckptdb import"):
        mgr.begin_checkpoint(4)
    FileCheckpointManager(mgr.checkpoint_dir, catalog=mgr.url)
    assert (foreign / "model.pt").read_bytes() == b"user data"


def test_many_metrics_and_best_by_metric(mgr: FileCheckpointManager) -> None:
    for step, loss, acc in [(1, 3.0, 0.2), (2, 2.0, 0.6), (3, 2.5, 0.4), (4, 2.8, 0.3)]:
        mgr.begin_checkpoint(step)
        mgr.save_state(make_state(step))
        mgr.save_score(loss, metric="valid_loss")
        mgr.save_score(acc, metric="accuracy")
        mgr.commit_checkpoint()
    mgr.keep_best_n_checkpoints(1, metric="accuracy")
    assert mgr.get_step_numbers() == [2, 4]


def test_second_save_state_call_refused(mgr: FileCheckpointManager) -> None:
    mgr.begin_checkpoint(1)
    mgr.save_state({"model": {"w": torch.zeros(2)}, "trainer": {"a": 1}})
    with pytest.raises(InvalidOperationError, match="one save_state"):
        mgr.save_state({"optimizer": {"b": 2}})
    mgr.commit_checkpoint()
    assert mgr.load_checkpoint(1)["trainer"] == {"a": 1}


def test_fairseq2_directory_hint(tmp_path: Path, catalog_url: str) -> None:
    d = tmp_path / "fs2"
    (d / "step_100").mkdir(parents=True)
    torch.save({"model": {"w": torch.zeros(1)}, "model_key": "model"}, d / "step_100" / "model.pt")
    m = FileCheckpointManager(d, catalog=catalog_url)
    with pytest.raises(CheckpointNotFoundError, match="ckptdb import"):
        m.load_last_checkpoint()


def test_fairseq2_tmp_directories_are_left_alone(tmp_path: Path, catalog_url: str) -> None:
    d = tmp_path / "fs2"
    (d / "step_5.tmp").mkdir(parents=True)
    (d / "step_5.tmp" / "rank_0.pt").write_bytes(b"partial")
    m = FileCheckpointManager(d, catalog=catalog_url)
    assert (d / "step_5.tmp" / "rank_0.pt").exists()
    assert m.last_recovery is not None and "step_5.tmp" in m.last_recovery.foreign

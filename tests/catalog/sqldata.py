"""A catalog with something in every corner, for the SQL cookbook, the views and the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest

from ckptdb import CheckpointCorruptError, FileCheckpointManager, KeepLast, SaveOptions
from tests.helpers import make_state

FAST = SaveOptions(fsync=False)


def save(m: FileCheckpointManager, step: int, **scores: float) -> None:
    m.begin_checkpoint(step)
    m.save_state(make_state(step))
    m.save_metadata({"lr": 0.001, "tokens_seen": step * 4096})
    for metric, value in scores.items():
        m.save_score(value, metric=metric)
    m.commit_checkpoint()


def valid_loss(step: int) -> float:
    return 2.0 - step / 1000 + (0.3 if step == 400 else 0.0)


def build(tmp_path: Path, url: str) -> dict[str, FileCheckpointManager]:
    """exp1: steps 100..600 (300 pinned, 100/200 pruned, 500 corrupt, 600 preserved-model after overwrite);
    exp2: three steps, one with a NaN score; empty-run: one aborted attempt, nothing committed."""
    m1 = FileCheckpointManager(tmp_path / "exp1", catalog=url, run="exp1", save_options=FAST)
    m1.save_model_metadata(family="toy", config={"dim": 8})
    for step in range(100, 700, 100):
        save(m1, step, score=-valid_loss(step), valid_loss=valid_loss(step))
    m1.pin(300, "keep-me")
    assert m1.apply_retention(KeepLast(3)) == [100, 200]
    model = tmp_path / "exp1" / "step_500" / "rank_0.pt"
    data = bytearray(model.read_bytes())
    data[-20] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorruptError):
        m1.load_checkpoint(500)

    m2 = FileCheckpointManager(tmp_path / "exp2", catalog=url, run="exp2", save_options=FAST)
    save(m2, 10, valid_loss=1.5)
    save(m2, 20, valid_loss=float("nan"))
    save(m2, 30, valid_loss=1.25)

    m3 = FileCheckpointManager(tmp_path / "empty", catalog=url, run="empty-run", save_options=FAST)
    m3.begin_checkpoint(5)
    m3.abort_checkpoint()
    return {"exp1": m1, "exp2": m2, "empty-run": m3}

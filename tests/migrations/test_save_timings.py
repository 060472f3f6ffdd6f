"""Revision 0003 (save timings): rows saved before it survive the upgrade with NULL timings; new
commits fill them in; the downgrade drops only the four columns."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import create_engine, inspect

from ckptdb import FileCheckpointManager
from ckptdb.catalog import migrate
from ckptdb.catalog.session import dispose_engines
from tests.helpers import assert_state_equal, make_state, save

TIMINGS = {"stage_seconds", "write_seconds", "sync_seconds", "commit_seconds"}


def columns(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return {c["name"] for c in inspect(engine).get_columns("checkpoints")}
    finally:
        engine.dispose()


def test_0003_up_and_down_with_data(tmp_path: Path, catalog_url: str) -> None:
    m = FileCheckpointManager(tmp_path / "c", catalog=catalog_url)
    save(m, 1)
    dispose_engines()
    migrate.downgrade(catalog_url, "0001")
    assert not TIMINGS & columns(catalog_url)
    migrate.upgrade(catalog_url)
    assert TIMINGS <= columns(catalog_url)
    dispose_engines()

    m = FileCheckpointManager(tmp_path / "c", catalog=catalog_url)
    (old,) = m.get_checkpoints()
    assert (old.stage_seconds, old.write_seconds, old.sync_seconds, old.commit_seconds) == (None, None, None, None)
    assert_state_equal(m.load_checkpoint(1), make_state(1))
    save(m, 2)
    new = m.get_checkpoints()[-1]
    assert new.write_seconds is not None and new.commit_seconds is not None

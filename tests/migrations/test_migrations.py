"""Migrations: one head, upgrade from empty, models == migrations on both backends, out-of-date
catalogs refused with the command to run, and no race when two processes create one catalog."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, text

from ckptdb import FileCheckpointManager, SchemaOutOfDateError
from ckptdb.catalog import Catalog, migrate
from ckptdb.catalog.models import VIEW_NAMES, Base
from ckptdb.catalog.session import dispose_engines
from ckptdb.cli import main as cli_main

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


def test_exactly_one_head() -> None:
    assert len(ScriptDirectory.from_config(migrate.alembic_config()).get_heads()) == 1


@pytest.mark.parametrize("empty_catalog_url", BACKENDS, indirect=True)
def test_models_and_migrations_agree(empty_catalog_url: str) -> None:
    migrate.upgrade(empty_catalog_url)
    engine = create_engine(empty_catalog_url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(
                conn, opts={"compare_type": True, "include_object": migrate.include_object}
            )
            diff = compare_metadata(ctx, Base.metadata)
            views = set(inspect(conn).get_view_names())
    finally:
        engine.dispose()
    assert diff == []
    assert views == set(VIEW_NAMES)


@pytest.mark.parametrize("empty_catalog_url", BACKENDS, indirect=True)
def test_manager_creates_a_new_catalog_and_refuses_an_old_one(tmp_path: Path, empty_catalog_url: str) -> None:
    m = FileCheckpointManager(tmp_path / "c", catalog=empty_catalog_url)
    assert migrate.current(empty_catalog_url) == migrate.head_revision()
    m.begin_checkpoint(1)
    m.save_state({"x": 1})
    m.commit_checkpoint()
    # a catalog written by a newer ckptdb is refused, not touched
    engine = create_engine(empty_catalog_url)
    with engine.begin() as c:
        c.execute(text("UPDATE alembic_version SET version_num = 'ffff'"))
    engine.dispose()
    dispose_engines()
    with pytest.raises(SchemaOutOfDateError, match="newer than this ckptdb"):
        FileCheckpointManager(tmp_path / "c", catalog=empty_catalog_url)


@pytest.mark.parametrize("empty_catalog_url", BACKENDS, indirect=True)
def test_tools_never_create_a_schema_silently(empty_catalog_url: str) -> None:
    with pytest.raises(SchemaOutOfDateError, match="ckptdb db upgrade"):
        Catalog(empty_catalog_url, create=False)


@pytest.mark.parametrize("empty_catalog_url", BACKENDS, indirect=True)
def test_downgrade_to_base_and_back(empty_catalog_url: str) -> None:
    migrate.upgrade(empty_catalog_url)
    migrate.downgrade(empty_catalog_url, "base")
    assert migrate.current(empty_catalog_url) is None
    migrate.upgrade(empty_catalog_url)
    assert migrate.current(empty_catalog_url) == migrate.head_revision()


def test_sqlite_pragmas(tmp_path: Path) -> None:
    m = FileCheckpointManager(tmp_path / "c")
    with m.catalog.db.engine.connect() as c:
        assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert c.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        assert c.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert c.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 1000


def test_two_processes_create_one_new_sqlite_catalog(tmp_path: Path) -> None:
    code = (
        "import sys; from ckptdb import FileCheckpointManager as M;"
        "m = M(sys.argv[1] + '/' + sys.argv[2], catalog='sqlite:///' + sys.argv[1] + '/catalog.db');"
        "m.begin_checkpoint(1); m.save_state({'x': 1}); m.commit_checkpoint()"
    )
    for attempt in range(3):
        d = tmp_path / f"shared{attempt}"
        d.mkdir()
        db = d / "catalog.db"
        procs = [
            subprocess.Popen([sys.executable, "-c", code, str(d), f"run{i}"], stderr=subprocess.PIPE) for i in range(4)
        ]
        errs = [p.communicate()[1].decode() for p in procs]
        assert all(p.returncode == 0 for p in procs), errs
        assert db.exists()
        engine = create_engine(f"sqlite:///{db}")
        with engine.connect() as c:
            assert c.execute(text("SELECT count(*) FROM runs")).scalar() == 4
        engine.dispose()


# -- revision 0002 (views) -----------------------------------------------------------------------

TABLES = ["runs", "checkpoints", "shards", "scores", "pins", "checkpoint_events"]


_LATER_COLUMNS = {"stage_seconds", "write_seconds", "sync_seconds", "commit_seconds"}  # 0003
_LATER_COLUMNS |= {"writer_boot_id", "writer_pid_ns"}  # 0004
_LATER_COLUMNS |= {"remote_checksum"}  # 0007


def _snapshot(url: str) -> dict[str, list[tuple[object, ...]]]:
    engine = create_engine(url)
    try:
        with engine.connect() as c:
            # the columns of revision 0001 (later revisions add columns that a downgrade drops by design)
            cols = {
                t: ", ".join(col.name for col in Base.metadata.tables[t].columns if col.name not in _LATER_COLUMNS)
                for t in TABLES
            }
            return {t: [tuple(r) for r in c.execute(text(f"SELECT {cols[t]} FROM {t} ORDER BY id"))] for t in TABLES}
    finally:
        engine.dispose()


def _schema_objects(url: str) -> tuple[set[str], set[str]]:
    engine = create_engine(url)
    try:
        with engine.connect() as c:
            insp = inspect(c)
            return set(insp.get_view_names()), {i["name"] for i in insp.get_indexes("checkpoints")}
    finally:
        engine.dispose()


def _populate(tmp_path: Path, url: str) -> None:
    m = FileCheckpointManager(tmp_path / "c", catalog=url, run="r")
    for step in (1, 2, 3):
        m.begin_checkpoint(step)
        m.save_state({"model": {"w": torch.ones(2) * step}, "step": step})
        m.save_score(float(step))
        m.commit_checkpoint()
    m.pin(2, "keep")
    m.delete_checkpoint(1)
    dispose_engines()


@pytest.mark.parametrize("empty_catalog_url", BACKENDS, indirect=True)
def test_0002_down_and_up_with_data_keeps_every_row(tmp_path: Path, empty_catalog_url: str) -> None:
    url = empty_catalog_url
    _populate(tmp_path, url)
    before = _snapshot(url)
    assert all(before[t] for t in TABLES)
    assert _schema_objects(url)[0] == set(VIEW_NAMES)

    migrate.downgrade(url, "0001")
    assert migrate.current(url) == "0001"
    views, indexes = _schema_objects(url)
    assert views == set() and "ix_checkpoints_state_committed_at" not in indexes
    assert _snapshot(url) == before

    migrate.upgrade(url)
    assert migrate.current(url) == migrate.head_revision()
    views, indexes = _schema_objects(url)
    assert views == set(VIEW_NAMES) and "ix_checkpoints_state_committed_at" in indexes
    assert _snapshot(url) == before
    engine = create_engine(url)
    with engine.connect() as c:
        rows = c.execute(text("SELECT step_nr, state, pinned FROM checkpoint_summary ORDER BY step_nr")).all()
        assert [tuple(r) for r in rows] == [(1, "deleted", 0), (2, "committed", 1), (3, "committed", 0)]
    engine.dispose()


@pytest.mark.parametrize("empty_catalog_url", BACKENDS, indirect=True)
def test_catalog_at_0001_is_refused_until_db_upgrade(
    tmp_path: Path, empty_catalog_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    url = empty_catalog_url
    _populate(tmp_path, url)
    migrate.downgrade(url, "0001")
    dispose_engines()
    with pytest.raises(SchemaOutOfDateError, match="ckptdb db upgrade") as err:
        FileCheckpointManager(tmp_path / "c", catalog=url, run="r")
    assert "0001" in str(err.value) and migrate.head_revision() in str(err.value)
    assert migrate.current(url) == "0001"  # refused, not silently upgraded

    assert cli_main(["db", "current", "--url", url]) == 1
    assert "needs `ckptdb db upgrade`" in capsys.readouterr().out
    r = subprocess.run(
        [sys.executable, "-m", "ckptdb.cli", "db", "upgrade", "--url", url], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert f"0001 -> {migrate.head_revision()}" in r.stdout
    assert cli_main(["db", "current", "--url", url, "--json"]) == 0
    assert '"up_to_date": true' in capsys.readouterr().out
    m = FileCheckpointManager(tmp_path / "c", catalog=url, run="r")
    step, state = m.load_last_checkpoint()
    assert step == 3 and torch.equal(state["model"]["w"], torch.ones(2) * 3)
    dispose_engines()
    assert cli_main(["db", "downgrade", "--url", url, "0001"]) == 0
    assert f"{migrate.head_revision()} -> 0001" in capsys.readouterr().out
    assert migrate.current(url) == "0001"

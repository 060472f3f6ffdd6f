"""Migrations: one head, upgrade from empty, models == migrations on both backends, out-of-date
catalogs refused with the command to run, and no race when two processes create one catalog."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, text

from ckptdb import FileCheckpointManager, SchemaOutOfDateError
from ckptdb.catalog import Catalog, migrate
from ckptdb.catalog.models import Base
from ckptdb.catalog.session import dispose_engines

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


def test_exactly_one_head() -> None:
    assert len(ScriptDirectory.from_config(migrate.alembic_config()).get_heads()) == 1


@pytest.mark.parametrize("empty_catalog_url", BACKENDS, indirect=True)
def test_models_and_migrations_agree(empty_catalog_url: str) -> None:
    migrate.upgrade(empty_catalog_url)
    engine = create_engine(empty_catalog_url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            diff = compare_metadata(ctx, Base.metadata)
    finally:
        engine.dispose()
    assert diff == []


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

"""Shared fixtures: a real SQLite file always; a real PostgreSQL database per test when a server is given.

PostgreSQL: ``--db-url postgresql+psycopg://postgres@127.0.0.1:5432/postgres`` or env
``CKPTDB_TEST_PG_URL``. A template database is migrated once per session; every test gets its
own database cloned from it and dropped afterwards, so runs never see each other's rows.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from ckptdb.catalog import migrate
from ckptdb.catalog.session import dispose_engines

pytest_plugins = ["tests.s3_fixtures"]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--db-url",
        default=os.environ.get("CKPTDB_TEST_PG_URL"),
        help="a PostgreSQL server URL (any database: tests create and drop their own)",
    )


def _pg_admin_url(config: pytest.Config) -> str | None:
    url = config.getoption("--db-url")
    return str(url) if url else None


class PgServer:
    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url
        self.engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
        self.template = f"ckptdb_tpl_{uuid.uuid4().hex[:10]}"
        self.created: list[str] = []

    def url_for(self, db: str) -> str:
        return make_url(self.admin_url).set(database=db).render_as_string(hide_password=False)

    def create(self, *, migrated: bool = True) -> str:
        name = f"ckptdb_t_{uuid.uuid4().hex[:12]}"
        with self.engine.connect() as c:
            if migrated:
                c.execute(text(f'CREATE DATABASE "{name}" TEMPLATE "{self.template}"'))
            else:
                c.execute(text(f'CREATE DATABASE "{name}"'))
        self.created.append(name)
        return self.url_for(name)

    def drop(self, url: str) -> None:
        name = make_url(url).database
        with self.engine.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))

    def setup(self) -> None:
        with self.engine.connect() as c:
            c.execute(text(f'CREATE DATABASE "{self.template}"'))
        url = self.url_for(self.template)
        migrate.upgrade(url)
        dispose_engines()

    def teardown(self) -> None:
        dispose_engines()
        for name in [*self.created, self.template]:
            with self.engine.connect() as c:
                c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        self.engine.dispose()


@pytest.fixture(scope="session")
def pg_server(request: pytest.FixtureRequest) -> Iterator[PgServer | None]:
    admin = _pg_admin_url(request.config)
    if not admin:
        yield None
        return
    server = PgServer(admin)
    server.setup()
    yield server
    server.teardown()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tpl") / "template.db"
    migrate.upgrade(f"sqlite:///{path}")
    dispose_engines()
    return path


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def catalog_url(request: pytest.FixtureRequest, tmp_path: Path, sqlite_template: Path) -> Iterator[str]:
    """A fresh, migrated catalog: a SQLite file, or a PostgreSQL database of this test's own."""
    if request.param == "sqlite":
        path = tmp_path / "catalog.db"
        path.write_bytes(sqlite_template.read_bytes())
        yield f"sqlite:///{path}"
        dispose_engines()
        return
    server: PgServer | None = request.getfixturevalue("pg_server")
    if server is None:
        pytest.skip("no PostgreSQL given (--db-url or CKPTDB_TEST_PG_URL)")
    url = server.create()
    yield url
    dispose_engines()
    server.drop(url)


@pytest.fixture
def empty_catalog_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Like catalog_url but with no schema (migrations tests). Parametrize indirectly via backend."""
    backend = getattr(request, "param", "sqlite")
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'empty.db'}"
        dispose_engines()
        return
    server: PgServer | None = request.getfixturevalue("pg_server")
    if server is None:
        pytest.skip("no PostgreSQL given (--db-url or CKPTDB_TEST_PG_URL)")
    url = server.create(migrated=False)
    yield url
    dispose_engines()
    server.drop(url)


@pytest.fixture(autouse=True)
def _no_env_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CKPTDB_URL", raising=False)

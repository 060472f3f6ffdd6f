"""Alembic environment: runs on the connection ckptdb hands over (see ckptdb.catalog.migrate)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from ckptdb.catalog.migrate import include_object
from ckptdb.catalog.models import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is None:  # plain `alembic` invocation with sqlalchemy.url set
        engine = create_engine(config.get_main_option("sqlalchemy.url") or "")
        with engine.begin() as conn:
            _run(conn)
        return
    _run(connection)


def _run(connection: object) -> None:
    context.configure(
        connection=connection,  # type: ignore[arg-type]
        target_metadata=target_metadata,
        include_object=include_object,
        render_as_batch=True,  # SQLite cannot ALTER most things in place
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise SystemExit("ckptdb migrations run online only: use `ckptdb db upgrade --url URL`")
run_migrations_online()

"""Alembic migrations for the catalog, shipped inside the package (see ckptdb.catalog.migrate)."""

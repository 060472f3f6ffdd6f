"""``CatalogCheckpoint`` for the ``pytorch_lightning`` package (see :mod:`ckptdb.lightning`)."""

from __future__ import annotations

from ckptdb.integrations.lightning_impl import build

_classes = build("pytorch_lightning")
CatalogCheckpoint = _classes.CatalogCheckpoint
CatalogCheckpointIO = _classes.CatalogCheckpointIO

__all__ = ["CatalogCheckpoint", "CatalogCheckpointIO"]

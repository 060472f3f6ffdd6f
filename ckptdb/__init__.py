"""ckptdb: transactional PyTorch checkpoints over a SQL catalog (SQLite or PostgreSQL)."""

__version__ = "0.1.0"

import importlib
from typing import TYPE_CHECKING, Any

from ckptdb.errors import (
    CatalogError,
    CatalogUnavailableError,
    CheckpointCorruptError,
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    InvalidArgumentError,
    InvalidOperationError,
    RankLostError,
    SchemaOutOfDateError,
    UnsafeCheckpointFileError,
    UnsupportedCheckpointError,
)
from ckptdb.options import LoadOptions, RecoveryOptions, SaveOptions
from ckptdb.retention import AnyOf, KeepBest, KeepEvery, KeepLast, KeepPinned

if TYPE_CHECKING:
    from ckptdb.loader import load_model
    from ckptdb.manager import FileCheckpointManager

# The names that need torch are imported on first use: ``import ckptdb`` and the CLI's catalog
# commands (``ckptdb sql``, ``list``, ``db upgrade``, ...) start without importing torch (~1.5 s).
_LAZY = {"FileCheckpointManager": "ckptdb.manager", "load_model": "ckptdb.loader"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ckptdb' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "AnyOf",
    "CatalogError",
    "CatalogUnavailableError",
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointNotFoundError",
    "FileCheckpointManager",
    "InvalidArgumentError",
    "InvalidOperationError",
    "KeepBest",
    "KeepEvery",
    "KeepLast",
    "KeepPinned",
    "LoadOptions",
    "RankLostError",
    "RecoveryOptions",
    "SaveOptions",
    "SchemaOutOfDateError",
    "UnsafeCheckpointFileError",
    "UnsupportedCheckpointError",
    "__version__",
    "load_model",
]

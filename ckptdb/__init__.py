"""ckptdb: transactional PyTorch checkpoints over a SQL catalog (SQLite or PostgreSQL)."""

__version__ = "0.1.0"

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
from ckptdb.loader import load_model
from ckptdb.manager import FileCheckpointManager
from ckptdb.options import LoadOptions, RecoveryOptions, SaveOptions
from ckptdb.retention import AnyOf, KeepBest, KeepEvery, KeepLast, KeepPinned

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

"""The SQL catalog: the source of truth for runs, checkpoints, files, scores and states."""

from ckptdb.catalog.store import Catalog, open_existing
from ckptdb.catalog.values import CheckpointInfo, RunInfo, SaveTimings, ShardInfo, WriterInfo

__all__ = ["Catalog", "CheckpointInfo", "RunInfo", "SaveTimings", "ShardInfo", "WriterInfo", "open_existing"]

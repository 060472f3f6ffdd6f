"""What every protocol module of a manager shares: the store, the gangs, the options, the catalog, the run.

:class:`~ckptdb.manager.FileCheckpointManager` builds one :class:`RunContext` and hands it to the
protocol modules (:mod:`ckptdb.commit`, :mod:`ckptdb.load`, :mod:`ckptdb.delete`), which hold no
other state of the manager.
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

from ckptdb import __version__, _proc
from ckptdb.catalog import Catalog, RunInfo, WriterInfo
from ckptdb.distributed import Gang, run_on_coordinator
from ckptdb.errors import InvalidOperationError
from ckptdb.options import LoadOptions, RecoveryOptions, SaveOptions
from ckptdb.recovery import RecoveryReport
from ckptdb.storage.store import Store

T = TypeVar("T")


@dataclass(eq=False)
class RunContext:
    """One manager's view of its run (rank-local; only rank 0 has a catalog)."""

    store: Store
    gang: Gang
    dp_gang: Gang
    tp_gang: Gang
    save_options: SaveOptions
    load_options: LoadOptions
    recovery_options: RecoveryOptions
    url: str  # the catalog's SQLAlchemy URL
    run_name: str
    who: tuple[str, int]  # (host, pid) recorded on the rows this process changes
    catalog_: Catalog | None = None  # rank 0 only
    run_: RunInfo | None = None  # every rank, once the catalog is open
    last_recovery: RecoveryReport | None = None

    @property
    def is_coordinator(self) -> bool:
        return self.gang.rank == 0

    @property
    def catalog(self) -> Catalog:
        if self.catalog_ is None:
            raise InvalidOperationError("only the coordinator rank (rank 0) talks to the catalog")
        return self.catalog_

    @property
    def run(self) -> RunInfo:
        assert self.run_ is not None, "the catalog is opened in the manager's constructor"
        return self.run_

    @property
    def checkpoint_dir(self) -> Path:
        """The local checkpoint directory (for the parts not yet written against the store)."""
        root = self.store.local_root
        assert root is not None, "an object store has no local checkpoint directory"
        return root

    @property
    def sfx(self) -> tuple[int, int]:
        """(tensor-parallel rank, size): fairseq2's file-name suffix."""
        return self.tp_gang.rank, self.tp_gang.size

    def on_coordinator(self, fn: Callable[[], T], what: str) -> T:
        """Run ``fn`` on rank 0 and give every rank its result, or its error (same type everywhere)."""
        return run_on_coordinator(self.gang, fn, what)

    def writer_info(self) -> WriterInfo:
        return WriterInfo(
            host=self.who[0],
            pid=self.who[1],
            start_time=_proc.process_start_time(self.who[1]),
            ckptdb_version=__version__,
            torch_version=torch.__version__,
            python_version=platform.python_version(),
            world_size=self.gang.size,
            boot_id=_proc.boot_id(),
            pid_ns=_proc.pid_namespace(),
        )


__all__ = ["RunContext"]

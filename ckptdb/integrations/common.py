"""What the trainer integrations share: catalog location, resume selection, scores, writer identity.

Nothing here imports a trainer package; everything goes through ckptdb's public catalog API.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ckptdb import __version__, _proc
from ckptdb.catalog import Catalog, CheckpointInfo, RunInfo, WriterInfo, open_existing
from ckptdb.catalog.models import State
from ckptdb.catalog.session import sqlite_url
from ckptdb.errors import CheckpointNotFoundError
from ckptdb.manager import default_run_name
from ckptdb.storage import layout
from ckptdb.verify import check_files, classify

log = logging.getLogger("ckptdb.integrations")

LAYOUT_KEY = "layout"  # user_metadata key naming a row's directory layout (see docs/integrations.md)


def resolve_url(checkpoint_dir: Path, catalog: str | None) -> str:
    """The catalog URL a :class:`~ckptdb.FileCheckpointManager` on ``checkpoint_dir`` would use."""
    return catalog or os.environ.get("CKPTDB_URL") or sqlite_url(checkpoint_dir / layout.CATALOG_FILE)


def find_run(catalog: Catalog, checkpoint_dir: Path, run: str | None) -> RunInfo | None:
    try:
        return catalog.get_run(run if run is not None else default_run_name(checkpoint_dir))
    except CheckpointNotFoundError:
        return None


def writer_info(world_size: int = 1) -> WriterInfo:
    pid = os.getpid()
    return WriterInfo(
        host=_proc.hostname(),
        pid=pid,
        start_time=_proc.process_start_time(pid),
        ckptdb_version=__version__,
        torch_version=torch.__version__,
        python_version=platform.python_version(),
        world_size=world_size,
        boot_id=_proc.boot_id(),  # without them recovery could only judge a dead writer by heartbeat
        pid_ns=_proc.pid_namespace(),
    )


def who() -> tuple[str, int]:
    return _proc.hostname(), os.getpid()


def newest_intact(
    catalog: Catalog,
    run: RunInfo,
    checkpoint_dir: Path,
    *,
    digest: bool = False,
    mark: bool = True,
) -> CheckpointInfo | None:
    """The newest committed checkpoint whose files are all there with their recorded sizes (and digests).

    A damaged newer one is skipped with a warning and, with ``mark``, recorded as ``corrupt`` /
    ``missing`` in the catalog (so ``ckptdb ls`` shows it and retention stops counting it).
    """
    below: int | None = None
    while True:
        info = catalog.newest_committed(run.id, below=below)
        if info is None:
            return None
        problems, _, _ = check_files(checkpoint_dir / info.directory, catalog.shards(info.id), digest=digest)
        problems = [p for p in problems if p.problem != "extra"]
        if not problems:
            return info
        bad = "; ".join(p.describe() for p in problems)
        log.warning("ckptdb: step %d is damaged (%s); falling back to an older checkpoint", info.step_nr, bad)
        if mark:
            catalog.mark_damaged(info.id, State(classify(problems)), f"resume check: {bad}"[:2000], who())
        below = info.step_nr


def scalar_scores(metrics: Mapping[str, Any], *, skip: frozenset[str] = frozenset()) -> dict[str, float]:
    """Every real-number (or one-element tensor) value of ``metrics``, as floats, by name."""
    out: dict[str, float] = {}
    for name, value in metrics.items():
        if not isinstance(name, str) or not name or name in skip or len(name) > 255:
            continue
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                continue
            value = value.detach().cpu().item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            continue
        out[name] = float(value)
    return out


def finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


__all__ = [
    "LAYOUT_KEY",
    "find_run",
    "newest_intact",
    "open_existing",
    "resolve_url",
    "scalar_scores",
    "who",
    "writer_info",
]
